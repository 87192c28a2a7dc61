//! Response heads from upstream (the agent or the Nova metadata API), framed for forwarding.
//!
//! The proxy forwards response bodies byte for byte, so all it needs from a head is where the body
//! ends ([`ResponseBody`]), whether the upstream connection can go back to the pool
//! (`keep_alive`), and the reason phrase to reproduce. LF-only line endings are accepted because
//! Neutron's own error pages use them. Ambiguous framing (CL+TE, differing Content-Lengths) is an
//! error rather than RFC 9112's "TE wins": a pooled upstream connection whose framing we guessed
//! wrong would poison every later response on it.
//!
//! `max_body_bytes` is not applied to responses. Every caller buffers a whole response before
//! relaying or reading it (the proxy's upstream pool, the agent's API and Neutron clients), so
//! each bounds it with its own response limit through [`frame_response`]'s `max_bytes`.

use smallvec::SmallVec;

use super::{
    find_header, head_window, spans_of, with_header_slots, Framing, HeaderSpan, HttpError, Limits,
    Span, Version,
};

/// How a response body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseBody {
    /// No body: answer to HEAD, 1xx, 204, 304, or `Content-Length: 0`.
    None,
    /// Exactly this many bytes follow the head.
    Length(u64),
    /// `Transfer-Encoding: chunked`; frame it with [`super::ChunkedScanner`].
    Chunked,
    /// Neither length nor chunked: the body runs until the upstream closes.
    UntilClose,
}

/// A parsed response head: offsets into the read buffer plus the framing decisions.
#[derive(Clone, Debug)]
pub struct ResponseHead {
    /// Status code (100..=999 as httparse accepts three digits).
    pub status: u16,
    /// Version from the status line.
    pub version: Version,
    /// Reason phrase bytes as sent (may be empty).
    pub reason: Span,
    /// Bytes of the head including the final empty line; the body (if any) starts here.
    pub head_len: usize,
    /// Header fields in order, duplicates kept.
    pub headers: SmallVec<[HeaderSpan; 24]>,
    /// How the body is delimited; `None` for HEAD requests, 1xx, 204, 304.
    pub body: ResponseBody,
    /// False if `Connection: close`, HTTP/1.0 without keep-alive, or `UntilClose`.
    pub keep_alive: bool,
}

impl ResponseHead {
    /// First header value with this name (ASCII case-insensitive).
    pub fn header<'a>(&self, buf: &'a [u8], name: &str) -> Option<&'a [u8]> {
        find_header(buf, &self.headers, name)
    }
}

/// Parse a response head from the start of `buf`.
///
/// `request_was_head`: the request this answers was HEAD (so no body whatever the headers say).
/// Returns `Ok(None)` when the head is incomplete.
///
/// # Errors
/// - [`HttpError::HeadTooLarge`] as soon as `buf.len() > max_head_bytes` with no complete head, or
///   more than `max_headers` fields.
/// - [`HttpError::Smuggling`] for Content-Length with Transfer-Encoding, or differing
///   Content-Lengths.
/// - [`HttpError::UnsupportedTransferEncoding`] for any coding but a single `chunked`.
/// - [`HttpError::Malformed`] for syntax errors (including obs-fold) and bad Content-Length.
pub fn parse_response(
    buf: &[u8],
    limits: &Limits,
    request_was_head: bool,
) -> Result<Option<ResponseHead>, HttpError> {
    let window = head_window(buf, limits);
    let parsed = with_header_slots(limits.max_headers, |slots| {
        let mut res = httparse::Response::new(&mut []);
        match httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut res, window, slots)?
        {
            httparse::Status::Partial => Ok::<_, HttpError>(None),
            httparse::Status::Complete(head_len) => Ok(Some((
                res.code.unwrap_or_default(),
                res.version.unwrap_or_default(),
                head_len,
                spans_of(window, res.headers),
            ))),
        }
    })?;
    let Some((status, version, head_len, headers)) = parsed else {
        return if buf.len() > window.len() {
            Err(HttpError::HeadTooLarge)
        } else {
            Ok(None)
        };
    };
    let version = match version {
        0 => Version::Http10,
        1 => Version::Http11,
        _ => return Err(HttpError::Malformed),
    };
    let reason = reason_span(buf, head_len);

    let f = Framing::scan(buf, &headers)?;
    if f.te_seen && f.content_length.is_some() {
        return Err(HttpError::Smuggling);
    }
    let bodiless = request_was_head || status < 200 || status == 204 || status == 304;
    let body = if bodiless {
        ResponseBody::None
    } else if f.te_seen {
        f.check_te()?;
        ResponseBody::Chunked
    } else {
        match f.content_length {
            Some(0) => ResponseBody::None,
            Some(n) => ResponseBody::Length(n),
            None => ResponseBody::UntilClose,
        }
    };
    let keep_alive = body != ResponseBody::UntilClose
        && match version {
            Version::Http11 => !f.conn_close,
            Version::Http10 => f.conn_keep_alive && !f.conn_close,
        };
    Ok(Some(ResponseHead {
        status,
        version,
        reason,
        head_len,
        headers,
        body,
        keep_alive,
    }))
}

/// Reason phrase of the status line httparse just accepted.
///
/// httparse drops the reason when it has obs-text, so find it ourselves: skip leading empty lines
/// (httparse does too), then the status line is `HTTP/1.x SP ddd [SP reason] (CR)LF`, with single
/// spaces because the lenient delimiter options are off.
fn reason_span(buf: &[u8], head_len: usize) -> Span {
    let head = &buf[..head_len];
    let start = head
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(0);
    let line_end = head[start..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(head_len, |p| start + p);
    let mut end = line_end;
    if end > start && head[end - 1] == b'\r' {
        end -= 1;
    }
    const PREFIX: usize = b"HTTP/1.1 200 ".len();
    let reason_start = (start + PREFIX).min(end);
    Span::new(reason_start, end - reason_start)
}

/// If `buf` starts with a complete response (head and body), its length and
/// head; `Ok(None)` means read more. Used by every client that relays or
/// reads whole responses (the proxy's upstream pool, the agent's API and
/// Neutron clients). `max_bytes` bounds the body. `eof`: the peer has closed, which completes a close-delimited body.
///
/// # Errors
/// The response is malformed or over the limits (the message says which).
pub fn frame_response(
    buf: &[u8],
    limits: &Limits,
    is_head: bool,
    max_bytes: u64,
    eof: bool,
) -> Result<Option<(usize, ResponseHead)>, String> {
    let head = match parse_response(buf, limits, is_head) {
        Ok(Some(h)) => h,
        Ok(None) => return Ok(None),
        Err(e) => return Err(format!("unparsable response head: {e}")),
    };
    let body = &buf[head.head_len..];
    let total = match head.body {
        ResponseBody::None => Some(head.head_len),
        ResponseBody::Length(n) => {
            if n > max_bytes {
                return Err(format!("response body of {n} bytes exceeds the limit"));
            }
            let n = usize::try_from(n).map_err(|_| "response too large".to_string())?;
            (body.len() >= n).then_some(head.head_len + n)
        }
        ResponseBody::Chunked => {
            let mut sc = super::ChunkedScanner::new(max_bytes);
            match sc.scan(body) {
                Ok(super::ChunkProgress::Done { consumed }) => Some(head.head_len + consumed),
                Ok(super::ChunkProgress::NeedMore { .. }) => None,
                Err(e) => return Err(format!("bad chunked body: {e}")),
            }
        }
        ResponseBody::UntilClose => {
            if body.len() as u64 > max_bytes {
                return Err("close-delimited response exceeds the limit".into());
            }
            eof.then_some(buf.len())
        }
    };
    if total.is_none() && buf.len() as u64 > max_bytes + limits.max_head_bytes as u64 {
        return Err("response exceeds the limit".into());
    }
    Ok(total.map(|t| (t, head)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(buf: &[u8], head: bool) -> Result<Option<ResponseHead>, HttpError> {
        parse_response(buf, &Limits::default(), head)
    }

    fn parse_ok(buf: &[u8], head: bool) -> ResponseHead {
        parse(buf, head).expect("parse error").expect("incomplete")
    }

    pub(crate) const JSON_200: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\n\r\n{\"uuid\": \"x\"}";

    #[test]
    fn content_length() {
        let h = parse_ok(JSON_200, false);
        assert_eq!(h.status, 200);
        assert_eq!(h.version, Version::Http11);
        assert_eq!(h.reason.get(JSON_200), b"OK");
        assert_eq!(h.body, ResponseBody::Length(13));
        assert!(h.keep_alive);
        assert_eq!(&JSON_200[h.head_len..], b"{\"uuid\": \"x\"}");
        assert_eq!(
            h.header(JSON_200, "content-type"),
            Some(&b"application/json"[..])
        );
    }

    #[test]
    fn framing_table() {
        // (response, request_was_head, body, keep_alive)
        let table: &[(&[u8], bool, ResponseBody, bool)] = &[
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                false,
                ResponseBody::Chunked,
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\n\r\n",
                false,
                ResponseBody::UntilClose,
                false,
            ),
            (
                b"HTTP/1.0 200 OK\r\n\r\n",
                false,
                ResponseBody::UntilClose,
                false,
            ),
            (
                b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n",
                false,
                ResponseBody::Length(2),
                false,
            ),
            (
                b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n",
                false,
                ResponseBody::Length(2),
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n",
                false,
                ResponseBody::Length(2),
                false,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
                true,
                ResponseBody::None,
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                true,
                ResponseBody::None,
                true,
            ),
            (b"HTTP/1.1 200 OK\r\n\r\n", true, ResponseBody::None, true),
            (
                b"HTTP/1.1 204 No Content\r\n\r\n",
                false,
                ResponseBody::None,
                true,
            ),
            (
                b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
                false,
                ResponseBody::None,
                true,
            ),
            (
                b"HTTP/1.1 100 Continue\r\n\r\n",
                false,
                ResponseBody::None,
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
                false,
                ResponseBody::None,
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nContent-Length: 7\r\n\r\n",
                false,
                ResponseBody::Length(7),
                true,
            ),
        ];
        for (res, head, body, ka) in table {
            let h = parse_ok(res, *head);
            let s = String::from_utf8_lossy(res);
            assert_eq!(h.body, *body, "{s}");
            assert_eq!(h.keep_alive, *ka, "{s}");
            assert_eq!(h.head_len, res.len(), "{s}");
        }
    }

    #[test]
    fn lf_only_neutron_error_page() {
        let res = b"HTTP/1.1 404 Not Found\nContent-Type: text/plain; charset=UTF-8\nConnection: close\nContent-Length: 3\n\nabc";
        let h = parse_ok(res, false);
        assert_eq!(h.status, 404);
        assert_eq!(h.reason.get(res), b"Not Found");
        assert_eq!(h.body, ResponseBody::Length(3));
        assert!(!h.keep_alive);
        assert_eq!(&res[h.head_len..], b"abc");
    }

    #[test]
    fn reason_phrases() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"HTTP/1.1 200 OK\r\n\r\n", b"OK"),
            (b"HTTP/1.1 200 \r\n\r\n", b""),
            (b"HTTP/1.1 200\r\n\r\n", b""),
            (b"HTTP/1.1 200\n\n", b""),
            (b"HTTP/1.1 404 Not  Found \r\n\r\n", b"Not  Found "),
            (b"HTTP/1.1 200 Gr\xfc\xdfe\r\n\r\n", b"Gr\xfc\xdfe"),
            (b"\r\nHTTP/1.1 500 Oops\r\n\r\n", b"Oops"),
        ];
        for (res, reason) in cases {
            let h = parse_ok(res, false);
            assert_eq!(
                h.reason.get(res),
                *reason,
                "{}",
                String::from_utf8_lossy(res)
            );
        }
    }

    #[test]
    fn errors() {
        let table: &[(&[u8], HttpError)] = &[
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                HttpError::Smuggling,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                HttpError::Smuggling,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
                HttpError::Smuggling,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 3x\r\n\r\n",
                HttpError::Malformed,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                HttpError::UnsupportedTransferEncoding,
            ),
            (
                b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
                HttpError::Malformed,
            ),
            (b"HTTP/2 200 OK\r\n\r\n", HttpError::Malformed),
            (b"HTTP/1.1 2000 OK\r\n\r\n", HttpError::Malformed),
            (b"HTTP/1.1 200 OK\r\nX : a\r\n\r\n", HttpError::Malformed),
        ];
        for (res, want) in table {
            assert_eq!(
                parse(res, false).unwrap_err(),
                *want,
                "{}",
                String::from_utf8_lossy(res)
            );
        }
    }

    #[test]
    fn prefixes_and_limits() {
        for i in 0..JSON_200.len() {
            let r = parse(&JSON_200[..i], false).unwrap();
            let head_len = JSON_200.len() - 13;
            assert_eq!(r.is_some(), i >= head_len, "prefix {i}");
        }
        let mut big = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 9000));
        assert_eq!(parse(&big, false).unwrap_err(), HttpError::HeadTooLarge);
    }
}
