//! Request heads: httparse for the syntax, then the framing and policy rules the proxy relies on.
//!
//! `parse_request` is called again after every read with the whole buffer so far; it returns
//! `Ok(None)` until a head is complete, and fails with `HeadTooLarge` as soon as the buffer passes
//! the head limit without one, so a slow client cannot make the proxy buffer without bound. The
//! result is all offsets ([`Span`]) plus the decisions every caller needs (body framing,
//! keep-alive, 100-continue), made once here so the proxy, agent and API cannot disagree.
//!
//! Policy beyond RFC 9112, each failing closed:
//! - Only origin-form targets (`/…`, ASCII). A metadata client never needs absolute-form
//!   (`http://host/path`), authority-form (CONNECT) or asterisk-form, and refusing them removes a
//!   class of host-confusion bugs where the proxy and the upstream would read different hosts.
//! - Only GET/HEAD/POST/PUT (405 otherwise). The HTTP/2 preface `PRI * HTTP/2.0` is a 400
//!   `Malformed` (bad version, and `PRI` is refused explicitly too), since it is not a method a
//!   client chose but a protocol mismatch.
//! - obs-fold, whitespace before the colon and control bytes in values are httparse errors → 400:
//!   folding a spoofed trust header onto another line must not survive to the rewrite.
//! - obs-text (bytes 0x80-0xFF) in a header value → 400, although RFC 9110 §5.5 tolerates it
//!   and httparse accepts it: no metadata client sends it, and peers decode it differently
//!   (Latin-1 in WSGI, UTF-8 or dropped elsewhere), so a value that looks harmless here could
//!   read as something else upstream. Names and targets are ASCII-only already.
//! - A second `Host` field → 400 (host confusion); a missing `Host` on HTTP/1.1 is tolerated,
//!   since the metadata service ignores it and minimal clients omit it.
//! - `Content-Length: 0` is reported as [`RequestBody::None`].

use smallvec::SmallVec;

use super::{
    find_header, head_window, spans_of, with_header_slots, Framing, HeaderSpan, HttpError, Limits,
    Span, Version,
};

/// The request methods the metadata path serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// `GET`
    Get,
    /// `HEAD`
    Head,
    /// `POST` (EC2/OpenStack password and IMDSv2-style token endpoints)
    Post,
    /// `PUT` (IMDSv2 token)
    Put,
}

impl Method {
    /// The method token as sent on the wire.
    pub fn as_str(&self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
        }
    }

    /// Method from its (case-sensitive) token.
    pub fn from_bytes(token: &[u8]) -> Option<Method> {
        match token {
            b"GET" => Some(Method::Get),
            b"HEAD" => Some(Method::Head),
            b"POST" => Some(Method::Post),
            b"PUT" => Some(Method::Put),
            _ => None,
        }
    }
}

/// How a request body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestBody {
    /// No body (no Content-Length / Transfer-Encoding, or `Content-Length: 0`).
    None,
    /// Exactly this many bytes follow the head (never 0, never above `max_body_bytes`).
    Length(u64),
    /// `Transfer-Encoding: chunked`; frame it with [`super::ChunkedScanner`].
    Chunked,
}

/// A parsed request head: offsets into the read buffer plus the framing decisions.
#[derive(Clone, Debug)]
pub struct RequestHead {
    /// Request method.
    pub method: Method,
    /// Version from the request line.
    pub version: Version,
    /// Request-target bytes as sent (origin-form, starts with `/`).
    pub target: Span,
    /// Bytes of the head including the final empty line; the body (if any) starts here.
    pub head_len: usize,
    /// Header fields in order, duplicates kept.
    pub headers: SmallVec<[HeaderSpan; 24]>,
    /// How the body is delimited.
    pub body: RequestBody,
    /// HTTP/1.1 unless a `Connection: close` token; HTTP/1.0 only with `Connection: keep-alive`.
    pub keep_alive: bool,
    /// `Expect: 100-continue` present (case-insensitive) on an HTTP/1.1 request.
    pub expect_continue: bool,
}

impl RequestHead {
    /// First header value with this name (ASCII case-insensitive).
    pub fn header<'a>(&self, buf: &'a [u8], name: &str) -> Option<&'a [u8]> {
        find_header(buf, &self.headers, name)
    }

    /// Number of headers with this name.
    pub fn header_count(&self, buf: &[u8], name: &str) -> usize {
        self.headers
            .iter()
            .filter(|h| h.name.get(buf).eq_ignore_ascii_case(name.as_bytes()))
            .count()
    }
}

/// Parse a request head from the start of `buf`.
///
/// Returns `Ok(None)` when the head is incomplete: read more and call again with the whole buffer.
///
/// # Errors
/// - [`HttpError::HeadTooLarge`] as soon as `buf.len() > max_head_bytes` with no complete head
///   inside the limit, or more than `max_headers` fields.
/// - [`HttpError::BodyTooLarge`] when Content-Length exceeds `max_body_bytes`.
/// - [`HttpError::Malformed`], [`HttpError::Smuggling`], [`HttpError::MethodNotAllowed`],
///   [`HttpError::UnsupportedTransferEncoding`] per the module rules.
pub fn parse_request(buf: &[u8], limits: &Limits) -> Result<Option<RequestHead>, HttpError> {
    let window = head_window(buf, limits);
    let parsed = with_header_slots(limits.max_headers, |slots| {
        let mut req = httparse::Request::new(&mut []);
        match req.parse_with_uninit_headers(window, slots)? {
            httparse::Status::Partial => Ok::<_, HttpError>(None),
            httparse::Status::Complete(head_len) => {
                let method = req.method.unwrap_or_default().as_bytes();
                let target = req.path.unwrap_or_default().as_bytes();
                let version = req.version.unwrap_or_default();
                Ok(Some((
                    Span::of(window, method),
                    Span::of(window, target),
                    version,
                    head_len,
                    spans_of(window, req.headers),
                )))
            }
        }
    })?;
    let Some((method, target, version, head_len, headers)) = parsed else {
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
    let method = match Method::from_bytes(method.get(buf)) {
        Some(m) => m,
        None if method.get(buf) == b"PRI" => return Err(HttpError::Malformed),
        None => return Err(HttpError::MethodNotAllowed),
    };
    let target_bytes = target.get(buf);
    if target_bytes.first() != Some(&b'/') || !target_bytes.is_ascii() {
        return Err(HttpError::Malformed);
    }
    if headers.iter().any(|h| !h.value.get(buf).is_ascii()) {
        return Err(HttpError::Malformed);
    }

    let f = Framing::scan(buf, &headers)?;
    if f.host_count > 1 {
        return Err(HttpError::Malformed);
    }
    // Invariant: the smuggling checks come before any TE value check, so `xchunked` + CL is
    // reported as the smuggling attempt it is.
    if f.te_seen && (version == Version::Http10 || f.content_length.is_some()) {
        return Err(HttpError::Smuggling);
    }
    let body = if f.te_seen {
        f.check_te()?;
        RequestBody::Chunked
    } else {
        match f.content_length {
            None | Some(0) => RequestBody::None,
            Some(n) if n > limits.max_body_bytes => return Err(HttpError::BodyTooLarge),
            Some(n) => RequestBody::Length(n),
        }
    };
    let keep_alive = match version {
        Version::Http11 => !f.conn_close,
        Version::Http10 => f.conn_keep_alive && !f.conn_close,
    };
    Ok(Some(RequestHead {
        method,
        version,
        target,
        head_len,
        headers,
        body,
        keep_alive,
        // RFC 9110 §10.1.1: a server MUST ignore 100-continue in an HTTP/1.0 request.
        expect_continue: f.expect_continue && version == Version::Http11,
    }))
}

/// Why a request handed over whole ([`parse_whole_request`]) is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WholeRequestError {
    /// The head is malformed or over a limit (a head still incomplete in a
    /// whole request is one over the cap: [`HttpError::HeadTooLarge`]).
    Head(HttpError),
    /// The head parsed (its method given); the chunked body is malformed or
    /// over `max_body_bytes`.
    Body(HttpError, Method),
    /// The head parsed; the body is shorter than its framing says. A
    /// connection would still be waiting for the rest, so this is its body
    /// timeout.
    Incomplete(Method),
}

/// Parse a request that is known to be whole: an in-process stage's
/// handover, framed by the stage before it (`metaproxy up` and `metaproxy
/// ovn` hand the agent stage and the API stage the exact bytes a socket would
/// have carried). Returns the head and the body's payload: the
/// `Content-Length` bytes after the head, or a chunked body decoded into
/// `decoded` within `limits.max_body_bytes`.
///
/// # Errors
/// See [`WholeRequestError`]: each is what the stage's own connection would
/// have refused.
pub fn parse_whole_request<'a>(
    req: &'a [u8],
    limits: &Limits,
    decoded: &'a mut Vec<u8>,
) -> Result<(RequestHead, &'a [u8]), WholeRequestError> {
    let head = match parse_request(req, limits) {
        Ok(Some(head)) => head,
        Ok(None) => return Err(WholeRequestError::Head(HttpError::HeadTooLarge)),
        Err(e) => return Err(WholeRequestError::Head(e)),
    };
    let rest = &req[head.head_len..];
    let body = match head.body {
        RequestBody::None => &[][..],
        RequestBody::Length(n) => match usize::try_from(n).ok().and_then(|n| rest.get(..n)) {
            Some(body) => body,
            None => return Err(WholeRequestError::Incomplete(head.method)),
        },
        RequestBody::Chunked => {
            let mut scanner = super::ChunkedScanner::new(limits.max_body_bytes);
            match scanner.decode(rest, decoded) {
                Ok(super::ChunkProgress::Done { .. }) => &decoded[..],
                Ok(super::ChunkProgress::NeedMore { .. }) => {
                    return Err(WholeRequestError::Incomplete(head.method))
                }
                Err(e) => return Err(WholeRequestError::Body(e, head.method)),
            }
        }
    };
    Ok((head, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::DEFAULT_MAX_HEAD_BYTES;

    pub(crate) const CLOUD_INIT_GET: &[u8] = b"GET /openstack/2018-08-27/meta_data.json HTTP/1.1\r\nHost: 169.254.169.254\r\nUser-Agent: Cloud-Init/22.4.2\r\nAccept: */*\r\nAccept-Encoding: gzip, deflate\r\nConnection: keep-alive\r\n\r\n";

    fn parse(buf: &[u8]) -> Result<Option<RequestHead>, HttpError> {
        parse_request(buf, &Limits::default())
    }

    fn parse_ok(buf: &[u8]) -> RequestHead {
        parse(buf).expect("parse error").expect("incomplete")
    }

    fn parse_err(buf: &[u8]) -> HttpError {
        match parse(buf) {
            Err(e) => e,
            Ok(r) => panic!(
                "expected error for {:?}, got {r:?}",
                String::from_utf8_lossy(buf)
            ),
        }
    }

    #[test]
    fn cloud_init_get() {
        let h = parse_ok(CLOUD_INIT_GET);
        assert_eq!(h.method, Method::Get);
        assert_eq!(h.version, Version::Http11);
        assert_eq!(
            h.target.get(CLOUD_INIT_GET),
            b"/openstack/2018-08-27/meta_data.json"
        );
        assert_eq!(h.head_len, CLOUD_INIT_GET.len());
        assert_eq!(h.headers.len(), 5);
        assert_eq!(h.body, RequestBody::None);
        assert!(h.keep_alive);
        assert!(!h.expect_continue);
        assert_eq!(
            h.header(CLOUD_INIT_GET, "host"),
            Some(&b"169.254.169.254"[..])
        );
        assert_eq!(
            h.header(CLOUD_INIT_GET, "USER-AGENT"),
            Some(&b"Cloud-Init/22.4.2"[..])
        );
        assert_eq!(h.header(CLOUD_INIT_GET, "x-missing"), None);
        assert_eq!(h.header_count(CLOUD_INIT_GET, "accept"), 1);
    }

    #[test]
    fn valid_requests() {
        // (request, method, body, keep_alive, expect_continue)
        let table: &[(&[u8], Method, RequestBody, bool, bool)] = &[
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", Method::Get, RequestBody::None, true, false),
            (b"HEAD /latest HTTP/1.1\r\n\r\n", Method::Head, RequestBody::None, true, false),
            (b"GET / HTTP/1.0\r\n\r\n", Method::Get, RequestBody::None, false, false),
            (
                b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n",
                Method::Get,
                RequestBody::None,
                true,
                false,
            ),
            (
                b"GET / HTTP/1.1\r\nConnection: foo, CLOSE\r\n\r\n",
                Method::Get,
                RequestBody::None,
                false,
                false,
            ),
            (
                b"POST /openstack/2013-04-04/password HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
                Method::Post,
                RequestBody::Length(5),
                true,
                false,
            ),
            (
                b"POST /p HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
                Method::Post,
                RequestBody::None,
                true,
                false,
            ),
            (
                b"PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 21600\r\n\r\n",
                Method::Put,
                RequestBody::None,
                true,
                false,
            ),
            (
                b"POST /p HTTP/1.1\r\nTransfer-Encoding: Chunked\r\nExpect: 100-Continue\r\n\r\n",
                Method::Post,
                RequestBody::Chunked,
                true,
                true,
            ),
            (
                b"POST /p HTTP/1.0\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\nhi",
                Method::Post,
                RequestBody::Length(2),
                false,
                false,
            ),
            (
                b"POST /p HTTP/1.1\r\nContent-Length: 3\r\ncontent-length: 3\r\n\r\n",
                Method::Post,
                RequestBody::Length(3),
                true,
                false,
            ),
            // Empty header values and LF-only line endings are fine.
            (b"GET / HTTP/1.1\nX-Empty:\nY:  \n\n", Method::Get, RequestBody::None, true, false),
        ];
        for (req, method, body, ka, cont) in table {
            let h = parse_ok(req);
            let s = String::from_utf8_lossy(req);
            assert_eq!(h.method, *method, "{s}");
            assert_eq!(h.body, *body, "{s}");
            assert_eq!(h.keep_alive, *ka, "{s}");
            assert_eq!(h.expect_continue, *cont, "{s}");
            let end = req.iter().rposition(|&b| b == b'\n').unwrap() + 1;
            assert_eq!(h.head_len, end, "{s}");
        }
    }

    #[test]
    fn empty_header_values() {
        let req = b"GET / HTTP/1.1\r\nX-Empty:\r\nY:   \r\n\r\n";
        let h = parse_ok(req);
        assert_eq!(h.header(req, "x-empty"), Some(&b""[..]));
        assert_eq!(h.header(req, "y"), Some(&b""[..]));
    }

    #[test]
    fn errors() {
        let table: &[(&[u8], HttpError)] = &[
            // Methods.
            (b"DELETE / HTTP/1.1\r\n\r\n", HttpError::MethodNotAllowed),
            (b"OPTIONS / HTTP/1.1\r\n\r\n", HttpError::MethodNotAllowed),
            (b"get / HTTP/1.1\r\n\r\n", HttpError::MethodNotAllowed),
            (b"CONNECT 169.254.169.254:80 HTTP/1.1\r\n\r\n", HttpError::MethodNotAllowed),
            // HTTP/2 preface and other versions.
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", HttpError::Malformed),
            (b"GET / HTTP/2.0\r\n\r\n", HttpError::Malformed),
            (b"GET / HTTP/0.9\r\n\r\n", HttpError::Malformed),
            (b"GET / HTTP/1.2\r\n\r\n", HttpError::Malformed),
            // Target forms.
            (b"GET http://169.254.169.254/latest HTTP/1.1\r\n\r\n", HttpError::Malformed),
            (b"GET * HTTP/1.1\r\n\r\n", HttpError::Malformed),
            (b"GET latest HTTP/1.1\r\n\r\n", HttpError::Malformed),
            (b"GET /caf\xc3\xa9 HTTP/1.1\r\n\r\n", HttpError::Malformed),
            // Header syntax.
            (b"GET / HTTP/1.1\r\nX-Instance-ID: a\r\n b\r\n\r\n", HttpError::Malformed),
            (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", HttpError::Malformed),
            (b"GET / HTTP/1.1\r\nX: a\0b\r\n\r\n", HttpError::Malformed),
            (b"GET / HTTP/1.1\r\nX: caf\xc3\xa9\r\n\r\n", HttpError::Malformed),
            (b"GET / HTTP/1.1\r\nX-Forwarded-For: 10.0.0.1\xff\r\n\r\n", HttpError::Malformed),
            (b"GET / HTTP/1.1\r\nX: a\x01b\r\n\r\n", HttpError::Malformed),
            (b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n", HttpError::Malformed),
            (b"GET / HTTP/1.1\r\n: a\r\n\r\n", HttpError::Malformed),
            (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", HttpError::Malformed),
            (b"GET  / HTTP/1.1\r\n\r\n", HttpError::Malformed),
            // Content-Length.
            (b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n", HttpError::Malformed),
            (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", HttpError::Malformed),
            (b"POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n", HttpError::Malformed),
            (b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n", HttpError::Malformed),
            (b"POST / HTTP/1.1\r\nContent-Length: 1 2\r\n\r\n", HttpError::Malformed),
            (b"POST / HTTP/1.1\r\nContent-Length:\r\n\r\n", HttpError::Malformed),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                HttpError::Malformed,
            ),
            (b"POST / HTTP/1.1\r\nContent-Length: 65537\r\n\r\n", HttpError::BodyTooLarge),
            // Smuggling forms.
            (
                b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                HttpError::Smuggling,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
                HttpError::Smuggling,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n",
                HttpError::Smuggling,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\nContent-Length: 5\r\n\r\n",
                HttpError::Smuggling,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                HttpError::Smuggling,
            ),
            (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", HttpError::Smuggling),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", HttpError::Smuggling),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                HttpError::Smuggling,
            ),
            // Transfer codings.
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n",
                HttpError::UnsupportedTransferEncoding,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                HttpError::UnsupportedTransferEncoding,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
                HttpError::UnsupportedTransferEncoding,
            ),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: \r\n\r\n", HttpError::Malformed),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked,\r\n\r\n", HttpError::Malformed),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding : chunked\r\n\r\n", HttpError::Malformed),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding:\x0bchunked\r\n\r\n", HttpError::Malformed),
        ];
        for (req, want) in table {
            assert_eq!(parse_err(req), *want, "{}", String::from_utf8_lossy(req));
        }
        for (req, want) in table {
            assert!(matches!(want.status(), 400 | 405 | 413 | 501), "{req:?}");
        }
    }

    #[test]
    fn every_strict_prefix_is_incomplete() {
        let chunked_post: &[u8] =
            b"POST /openstack/2013-04-04/password HTTP/1.1\r\nHost: 169.254.169.254\r\nTransfer-Encoding: chunked\r\n\r\n";
        for req in [CLOUD_INIT_GET, chunked_post] {
            let full = parse_ok(req);
            for i in 0..req.len() {
                assert!(parse(&req[..i]).unwrap().is_none(), "prefix {i}");
            }
            // Bytes after the head (a body, a pipelined request) do not change the result.
            let mut more = req.to_vec();
            more.extend_from_slice(b"5\r\nhello\r\n0\r\n\r\nGET / HTTP/1.1\r\n");
            let again = parse_ok(&more);
            assert_eq!(format!("{full:?}"), format!("{again:?}"));
        }
    }

    fn head_of_size(size: usize) -> Vec<u8> {
        let mut v = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
        let pad = size - v.len() - 4;
        v.extend(std::iter::repeat_n(b'a', pad));
        v.extend_from_slice(b"\r\n\r\n");
        assert_eq!(v.len(), size);
        v
    }

    #[test]
    fn head_size_limit() {
        let at = head_of_size(DEFAULT_MAX_HEAD_BYTES);
        assert_eq!(parse_ok(&at).head_len, DEFAULT_MAX_HEAD_BYTES);
        // With a body following the head the buffer may be larger than the limit.
        let mut with_body = at.clone();
        with_body.extend_from_slice(b"xxxxxx");
        assert!(parse(&with_body).unwrap().is_some());

        let over = head_of_size(DEFAULT_MAX_HEAD_BYTES + 1);
        assert_eq!(parse_err(&over), HttpError::HeadTooLarge);
        // Incomplete and exactly at the limit: read more. One byte over: refuse.
        assert!(parse(&over[..DEFAULT_MAX_HEAD_BYTES]).unwrap().is_none());
        assert_eq!(
            parse_err(&over[..DEFAULT_MAX_HEAD_BYTES + 1]),
            HttpError::HeadTooLarge
        );
        // A never-ending head is refused as soon as it passes the limit.
        let endless = vec![b'a'; DEFAULT_MAX_HEAD_BYTES + 1];
        let mut g = b"GET /".to_vec();
        g.extend_from_slice(&endless);
        assert_eq!(parse_err(&g), HttpError::HeadTooLarge);
    }

    #[test]
    fn header_count_limit() {
        let build = |n: usize| {
            let mut v = b"GET / HTTP/1.1\r\n".to_vec();
            for i in 0..n {
                v.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
            }
            v.extend_from_slice(b"\r\n");
            v
        };
        assert_eq!(parse_ok(&build(64)).headers.len(), 64);
        assert_eq!(parse_err(&build(65)), HttpError::HeadTooLarge);
        // Also while still incomplete.
        let b65 = build(65);
        assert_eq!(parse_err(&b65[..b65.len() - 2]), HttpError::HeadTooLarge);
        // A large configured limit uses heap slots.
        let limits = Limits {
            max_headers: 200,
            ..Limits::default()
        };
        assert_eq!(
            parse_request(&build(150), &limits)
                .unwrap()
                .unwrap()
                .headers
                .len(),
            150
        );
    }

    #[test]
    fn body_size_limit() {
        let ok = b"POST / HTTP/1.1\r\nContent-Length: 65536\r\n\r\n";
        assert_eq!(parse_ok(ok).body, RequestBody::Length(65536));
        let over = b"POST / HTTP/1.1\r\nContent-Length: 65537\r\n\r\n";
        assert_eq!(parse_err(over), HttpError::BodyTooLarge);
        assert_eq!(HttpError::BodyTooLarge.status(), 413);
    }

    #[test]
    fn method_round_trip() {
        for m in [Method::Get, Method::Head, Method::Post, Method::Put] {
            assert_eq!(Method::from_bytes(m.as_str().as_bytes()), Some(m));
        }
    }

    #[test]
    fn a_whole_request_gives_its_head_and_body_payload() {
        let whole = |req: &[u8]| {
            let mut decoded = Vec::new();
            parse_whole_request(req, &Limits::default(), &mut decoded)
                .map(|(head, body)| (head.method, body.to_vec()))
        };
        assert_eq!(whole(CLOUD_INIT_GET), Ok((Method::Get, Vec::new())));
        let post = b"POST /openstack/latest/password HTTP/1.1\r\nContent-Length: 5\r\n\r\nsecret";
        assert_eq!(
            whole(post),
            Ok((Method::Post, b"secre".to_vec())),
            "exactly its length"
        );
        let chunked =
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(whole(chunked), Ok((Method::Post, b"abcde".to_vec())));

        // What the stage's connection would have refused, with the method
        // once the head parsed (a HEAD's refusal has no body).
        let short = b"POST / HTTP/1.1\r\nContent-Length: 9\r\n\r\nabc";
        assert_eq!(
            whole(short),
            Err(WholeRequestError::Incomplete(Method::Post))
        );
        let cut = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab";
        assert_eq!(whole(cut), Err(WholeRequestError::Incomplete(Method::Post)));
        let bad = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        assert!(matches!(
            whole(bad),
            Err(WholeRequestError::Body(HttpError::BadChunk, Method::Post))
        ));
        let limits = Limits {
            max_body_bytes: 4,
            ..Limits::default()
        };
        let mut decoded = Vec::new();
        assert!(matches!(
            parse_whole_request(chunked, &limits, &mut decoded),
            Err(WholeRequestError::Body(
                HttpError::BodyTooLarge,
                Method::Post
            ))
        ));
        assert_eq!(
            whole(b"GET / HTTP/1.1\r\nHost: a\r\n"),
            Err(WholeRequestError::Head(HttpError::HeadTooLarge)),
            "a head still open in a whole request is over the cap"
        );
        let smuggle =
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc";
        assert_eq!(
            whole(smuggle),
            Err(WholeRequestError::Head(HttpError::Smuggling))
        );
    }
}
