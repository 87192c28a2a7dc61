//! IO-free HTTP/1.1 for the metadata path, built on `httparse`.
//!
//! Everything here works on byte slices the caller owns and hands back plain values: a parsed head
//! is a set of [`Span`]s (offsets into the read buffer), never borrows, so the buffer can go back
//! to the kernel or be reused for the next read while the head is still in hand. There are no
//! runtime types, sockets or timers in this module; that keeps it unit-, split-read- and
//! fuzz-testable, and lets `rt` own every byte of IO.
//!
//! The parser is deliberately stricter than RFC 9112 where leniency only helps an attacker: a
//! metadata client (cloud-init, curl, wget, Ignition, the EC2 SDKs) sends origin-form GETs with a
//! handful of headers, so anything that could make the proxy and the upstream disagree about where
//! a message ends (CL+TE, differing Content-Lengths, obs-fold, odd transfer codings) fails closed
//! with a 4xx/5xx instead of being "repaired". Rejected alternatives: a hand-written parser (more
//! code to fuzz, no speed gain over httparse's SIMD scanning) and `http`/`hyper` types (they own
//! or borrow the buffer and drag a runtime's shape into a module that must not have one).

mod canned;
mod chunked;
mod request;
mod response;
mod rewrite;
pub mod write;

use std::mem::MaybeUninit;

pub use canned::{canned, canned_for, reason, CONTINUE_100};
pub use chunked::{
    ChunkProgress, ChunkedScanner, MAX_CHUNK_LINE_BYTES, MAX_TRAILER_BYTES, MIN_CHUNK_FRAMING_BYTES,
};
pub use request::{
    parse_request, parse_whole_request, Method, RequestBody, RequestHead, WholeRequestError,
};
pub use response::{frame_response, parse_response, ResponseBody, ResponseHead};
pub use rewrite::{
    format_ip_for_xff, is_hop_by_hop, is_token_header, is_trust_header, rewrite_proxy_request,
    write_request_head, write_response_head, IpText, HOP_BY_HOP, TOKEN_HEADERS, TRUST_HEADERS,
    TTL_HEADERS,
};
pub use write::{put_header, write_answer, HeaderName, HeaderValue, InvalidHeader};

/// Largest request or response head (request/status line + headers + final empty line), in bytes.
pub const DEFAULT_MAX_HEAD_BYTES: usize = 8 * 1024;
/// Largest number of header fields in one head.
pub const DEFAULT_MAX_HEADERS: usize = 64;
/// Largest request body (Content-Length or decoded chunked payload), in bytes.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 64 * 1024;
/// Largest metadata response body relayed or accepted, in bytes: the
/// proxy's default `max_response_bytes` and the agent's cap on the API's
/// answers (Nova caps user-data at 64 KiB; the largest documents are a few
/// hundred KiB).
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 4 * 1024 * 1024;

/// Longest request target an access-log line carries.
pub const LOG_TARGET_MAX: usize = 256;

/// A request target as an access log writes it: escaped (a target cannot
/// forge a log line or carry terminal escapes) and cut at [`LOG_TARGET_MAX`]
/// bytes, with `...` when cut.
pub fn loggable_target(target: &[u8]) -> String {
    let cut = &target[..target.len().min(LOG_TARGET_MAX)];
    let mut out: String = cut.escape_ascii().to_string();
    if target.len() > cut.len() {
        out.push_str("...");
    }
    out
}

/// Header slots kept on the stack while parsing; above this `Limits::max_headers` falls back to a
/// heap-allocated slot array (only reachable with a non-default, very large limit).
const STACK_HEADER_SLOTS: usize = 128;

/// Size bounds applied while parsing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest head in bytes, including the final empty line. A head of exactly this size is accepted.
    pub max_head_bytes: usize,
    /// Largest number of header fields; one more is [`HttpError::HeadTooLarge`].
    pub max_headers: usize,
    /// Largest request body in bytes (Content-Length checked at parse time, chunked by
    /// [`ChunkedScanner`]).
    pub max_body_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head_bytes: DEFAULT_MAX_HEAD_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }
}

/// Offsets into the read buffer (never a borrow).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Span {
    /// Offset of the first byte.
    pub start: u32,
    /// Length in bytes.
    pub len: u32,
}

impl Span {
    /// The bytes this span covers in `buf`, which must be the buffer the span was parsed from
    /// (or one that starts with the same bytes).
    ///
    /// # Panics
    /// If the span lies outside `buf` (debug builds assert it first, with a clearer message).
    pub fn get<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        let start = self.start as usize;
        let end = start + self.len as usize;
        debug_assert!(
            end <= buf.len(),
            "span {self:?} outside buffer of {}",
            buf.len()
        );
        &buf[start..end]
    }

    /// Offset one past the last byte.
    pub fn end(&self) -> usize {
        self.start as usize + self.len as usize
    }

    pub(crate) fn new(start: usize, len: usize) -> Span {
        debug_assert!(start + len <= u32::MAX as usize);
        Span {
            start: start as u32,
            len: len as u32,
        }
    }

    /// Span of `part`, which must be a sub-slice of `buf`.
    ///
    /// Invariant: httparse returns sub-slices of the buffer it was given (empty header values point
    /// at the whitespace before the line end), so the pointer difference is the offset.
    pub(crate) fn of(buf: &[u8], part: &[u8]) -> Span {
        let start = (part.as_ptr() as usize).wrapping_sub(buf.as_ptr() as usize);
        debug_assert!(start + part.len() <= buf.len(), "sub-slice outside buffer");
        Span::new(start, part.len())
    }
}

/// One header field as offsets into the buffer: the name as sent (case preserved) and the value
/// with surrounding whitespace trimmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeaderSpan {
    /// Field name bytes as sent.
    pub name: Span,
    /// Field value bytes, leading and trailing whitespace excluded; may be empty.
    pub value: Span,
}

/// HTTP version of a request or response line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// `HTTP/1.0`
    Http10,
    /// `HTTP/1.1`
    Http11,
}

/// Why a head or body was refused; [`HttpError::status`] gives the status to answer with.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum HttpError {
    /// Syntax error (bad request line, header syntax, obs-fold, non-ASCII request header value, bad
    /// Content-Length, non-origin-form target, HTTP version other than 1.0/1.1, HTTP/2 preface):
    /// 400.
    #[error("malformed HTTP message")]
    Malformed,
    /// Ambiguous message framing (CL+TE, differing Content-Lengths, TE on HTTP/1.0, chunked applied
    /// twice): 400. Kept apart from `Malformed` so it can be counted as an attack.
    #[error("ambiguous message framing (possible request smuggling)")]
    Smuggling,
    /// Head larger than `max_head_bytes` or more than `max_headers` fields: 431.
    #[error("message head too large")]
    HeadTooLarge,
    /// Body larger than `max_body_bytes`: 413.
    #[error("message body too large")]
    BodyTooLarge,
    /// Transfer-Encoding other than exactly `chunked`: 501.
    #[error("unsupported transfer encoding")]
    UnsupportedTransferEncoding,
    /// Method other than GET/HEAD/POST/PUT: 405.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// Bad chunked framing: 400 for a request body; for a response, an upstream framing error.
    #[error("bad chunked encoding")]
    BadChunk,
}

impl HttpError {
    /// The status code to send to a client whose request caused this error.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::Malformed | HttpError::Smuggling | HttpError::BadChunk => 400,
            HttpError::HeadTooLarge => 431,
            HttpError::BodyTooLarge => 413,
            HttpError::UnsupportedTransferEncoding => 501,
            HttpError::MethodNotAllowed => 405,
        }
    }
}

impl From<httparse::Error> for HttpError {
    fn from(e: httparse::Error) -> Self {
        match e {
            httparse::Error::TooManyHeaders => HttpError::HeadTooLarge,
            _ => HttpError::Malformed,
        }
    }
}

/// First value of header `name` (ASCII case-insensitive) among `headers`.
pub(crate) fn find_header<'a>(
    buf: &'a [u8],
    headers: &[HeaderSpan],
    name: &str,
) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|h| h.name.get(buf).eq_ignore_ascii_case(name.as_bytes()))
        .map(|h| h.value.get(buf))
}

/// Elements of a comma-separated list value with optional whitespace trimmed; empty elements are
/// yielded as empty slices so callers can decide whether to accept them.
pub(crate) fn list_elements(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(trim_ows)
}

pub(crate) fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Content-Length value: one or more ASCII digits, nothing else, no overflow.
pub(crate) fn parse_content_length(v: &[u8]) -> Result<u64, HttpError> {
    if v.is_empty() {
        return Err(HttpError::Malformed);
    }
    let mut n: u64 = 0;
    for &b in v {
        if !b.is_ascii_digit() {
            return Err(HttpError::Malformed);
        }
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(b - b'0')))
            .ok_or(HttpError::Malformed)?;
    }
    Ok(n)
}

/// What the framing-relevant headers of one head say, before version/method rules are applied.
#[derive(Default)]
pub(crate) struct Framing {
    pub content_length: Option<u64>,
    pub te_seen: bool,
    pub te_chunked_count: u32,
    pub te_unsupported: bool,
    pub te_empty_element: bool,
    pub conn_close: bool,
    pub conn_keep_alive: bool,
    pub expect_continue: bool,
    pub host_count: u32,
}

impl Framing {
    /// One pass over the headers. Errors only for per-field problems (bad or differing
    /// Content-Length); cross-field rules are left to the request/response parser.
    pub(crate) fn scan(buf: &[u8], headers: &[HeaderSpan]) -> Result<Framing, HttpError> {
        let mut f = Framing::default();
        for h in headers {
            let name = h.name.get(buf);
            let value = h.value.get(buf);
            if name.eq_ignore_ascii_case(b"content-length") {
                let n = parse_content_length(value)?;
                match f.content_length {
                    Some(prev) if prev != n => return Err(HttpError::Smuggling),
                    _ => f.content_length = Some(n),
                }
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                f.te_seen = true;
                for coding in list_elements(value) {
                    if coding.is_empty() {
                        f.te_empty_element = true;
                    } else if coding.eq_ignore_ascii_case(b"chunked") {
                        f.te_chunked_count += 1;
                    } else {
                        f.te_unsupported = true;
                    }
                }
            } else if name.eq_ignore_ascii_case(b"connection") {
                for token in list_elements(value) {
                    if token.eq_ignore_ascii_case(b"close") {
                        f.conn_close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        f.conn_keep_alive = true;
                    }
                }
            } else if name.eq_ignore_ascii_case(b"expect") {
                if value.eq_ignore_ascii_case(b"100-continue") {
                    f.expect_continue = true;
                }
            } else if name.eq_ignore_ascii_case(b"host") {
                f.host_count += 1;
            }
        }
        Ok(f)
    }

    /// Transfer-Encoding rules shared by requests and responses, applied after CL+TE was ruled
    /// out: anything but a single `chunked` coding is refused.
    ///
    /// `chunked` listed twice (in one field or across fields) is `Smuggling` rather than 501:
    /// RFC 9112 §6.1 forbids applying chunked twice, and peers disagree on whether to decode once
    /// or twice, which is exactly a framing desync.
    pub(crate) fn check_te(&self) -> Result<(), HttpError> {
        if self.te_unsupported {
            Err(HttpError::UnsupportedTransferEncoding)
        } else if self.te_empty_element || self.te_chunked_count == 0 {
            Err(HttpError::Malformed)
        } else if self.te_chunked_count > 1 {
            Err(HttpError::Smuggling)
        } else {
            Ok(())
        }
    }
}

/// Run `f` with `max_headers` uninitialised header slots, on the stack when small enough.
///
/// Uninitialised slots (httparse's safe `*_with_uninit_headers` API) avoid zeroing a few KiB of
/// slots on every parse attempt, which was a visible share of a cloud-init request's parse time.
pub(crate) fn with_header_slots<'b, R>(
    max_headers: usize,
    f: impl FnOnce(&mut [MaybeUninit<httparse::Header<'b>>]) -> R,
) -> R {
    if max_headers <= STACK_HEADER_SLOTS {
        let mut slots = [const { MaybeUninit::uninit() }; STACK_HEADER_SLOTS];
        f(&mut slots[..max_headers])
    } else {
        let mut slots = Vec::with_capacity(max_headers);
        slots.resize_with(max_headers, MaybeUninit::uninit);
        f(&mut slots)
    }
}

/// Cap the bytes handed to httparse at the head limit (and at what a `u32` span can address).
///
/// Invariant: parsing only the first `max_head_bytes` bytes both bounds the work per re-read and
/// makes "complete head larger than the limit" impossible to miss: such a head is still partial
/// inside the window, and the caller turns partial + `buf.len() > max` into `HeadTooLarge`.
pub(crate) fn head_window<'a>(buf: &'a [u8], limits: &Limits) -> &'a [u8] {
    let max = limits.max_head_bytes.min(u32::MAX as usize);
    &buf[..buf.len().min(max)]
}

pub(crate) fn spans_of(
    buf: &[u8],
    headers: &[httparse::Header<'_>],
) -> smallvec::SmallVec<[HeaderSpan; 24]> {
    headers
        .iter()
        .map(|h| HeaderSpan {
            name: Span::of(buf, h.name.as_bytes()),
            value: Span::of(buf, h.value),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn loggable_targets_are_escaped_and_bounded() {
        use super::loggable_target;
        assert_eq!(
            loggable_target(b"/openstack/latest/meta_data.json"),
            "/openstack/latest/meta_data.json"
        );
        assert_eq!(loggable_target(b"/a\"b\x1b[31m\n"), "/a\\\"b\\x1b[31m\\n");
        let long = vec![b'a'; 1000];
        let out = loggable_target(&long);
        assert_eq!(out.len(), super::LOG_TARGET_MAX + 3);
        assert!(out.ends_with("..."));
    }

    use super::*;

    #[test]
    fn error_statuses() {
        let table = [
            (HttpError::Malformed, 400),
            (HttpError::Smuggling, 400),
            (HttpError::HeadTooLarge, 431),
            (HttpError::BodyTooLarge, 413),
            (HttpError::UnsupportedTransferEncoding, 501),
            (HttpError::MethodNotAllowed, 405),
            (HttpError::BadChunk, 400),
        ];
        for (e, s) in table {
            assert_eq!(e.status(), s, "{e:?}");
        }
    }

    #[test]
    fn content_length_values() {
        assert_eq!(parse_content_length(b"0"), Ok(0));
        assert_eq!(parse_content_length(b"00012"), Ok(12));
        assert_eq!(parse_content_length(b"18446744073709551615"), Ok(u64::MAX));
        for bad in [
            &b""[..],
            b"+5",
            b"-5",
            b"5 6",
            b"5, 6",
            b"0x10",
            b"18446744073709551616",
            b"99999999999999999999999",
        ] {
            assert_eq!(
                parse_content_length(bad),
                Err(HttpError::Malformed),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn span_get() {
        let buf = b"hello world";
        let s = Span { start: 6, len: 5 };
        assert_eq!(s.get(buf), b"world");
        assert_eq!(s.end(), 11);
        assert_eq!(Span::of(buf, &buf[2..4]), Span { start: 2, len: 2 });
    }

    /// A connection's view: a chunked POST followed by a pipelined GET arrives in two reads split
    /// at every byte; the head parses once complete and the scanner finds exactly the body.
    #[test]
    fn chunked_post_split_at_every_byte() {
        let head: &[u8] = b"POST /openstack/2013-04-04/password HTTP/1.1\r\nHost: 169.254.169.254\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n";
        let body: &[u8] = b"4;x=y\r\nabcd\r\n10\r\n0123456789abcdef\r\n0\r\nX-T: 1\r\n\r\n";
        let next: &[u8] = b"GET / HTTP/1.1\r\n\r\n";
        let stream = [head, body, next].concat();
        let limits = Limits::default();
        let want = parse_request(head, &limits).unwrap().unwrap();
        assert_eq!(want.body, RequestBody::Chunked);

        for split in 0..=stream.len() {
            let mut buf = Vec::new();
            let mut parsed = None;
            let mut scanner = ChunkedScanner::default();
            let mut payload = Vec::new();
            let mut body_consumed = 0;
            let mut done = false;
            for read in [&stream[..split], &stream[split..]] {
                let body_part = if parsed.is_none() {
                    buf.extend_from_slice(read);
                    match parse_request(&buf, &limits).unwrap() {
                        None => {
                            assert!(buf.len() < head.len(), "split {split}");
                            continue;
                        }
                        Some(h) => {
                            let start = h.head_len;
                            parsed = Some(h);
                            &buf[start..]
                        }
                    }
                } else {
                    read
                };
                match scanner.decode(body_part, &mut payload).unwrap() {
                    ChunkProgress::NeedMore { consumed } => body_consumed += consumed,
                    ChunkProgress::Done { consumed } => {
                        body_consumed += consumed;
                        done = true;
                        break;
                    }
                }
            }
            let h = parsed.expect("head parsed");
            assert_eq!(format!("{h:?}"), format!("{want:?}"), "split {split}");
            assert!(done, "split {split}");
            assert_eq!(body_consumed, body.len(), "split {split}");
            assert_eq!(payload, b"abcd0123456789abcdef", "split {split}");
        }
    }

    #[test]
    fn trims_ows() {
        assert_eq!(trim_ows(b" \t a b \t"), b"a b");
        assert_eq!(trim_ows(b"   "), b"");
        let v: Vec<&[u8]> = list_elements(b"a, b ,,c").collect();
        assert_eq!(v, vec![&b"a"[..], b"b", b"", b"c"]);
    }
}
