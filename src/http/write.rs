//! The one writer of generated heads: header fields that cannot end the field, and answers that
//! follow HEAD framing.
//!
//! Two defects shaped this module. A Neutron `device_id` (tenant-controlled, up to 255
//! characters) was copied byte for byte into `X-Instance-ID`, so `\r\n` in it smuggled a second
//! request onto the agent's pooled connection to the API and desynchronised every answer behind
//! it. And the agent's error pages carried a body after a HEAD, which the proxy (correctly) did
//! not read, so the leftover bytes were taken as the start of the next answer on that connection.
//! Both came from writing heads by hand in several places.
//!
//! So a field is written only through [`put_header`], which takes a [`HeaderName`] (an RFC 9110
//! token, checked at compile time for constants) and a [`HeaderValue`] (no CR, LF, NUL or other
//! control byte but HTAB: checked once, where the value is made). A value from outside therefore
//! has to be validated before it can be written at all, and a caller that holds a stronger type
//! (the agent's instance and project ids) converts it without a second scan of the network bytes.
//! Every answer a daemon makes up itself goes through [`write_answer`], which writes the
//! `Content-Length` of the body and leaves the body out when the request was HEAD (RFC 9110
//! §9.3.2). Rejected: escaping or stripping bad bytes (a mangled instance id would be signed and
//! sent as if it were someone's), and checking in `put_header` itself (a writer that can fail
//! half-way through a head leaves a half-written head in the buffer).

/// Why a header name or value was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidHeader {
    /// The name is empty or has a byte outside RFC 9110's `tchar`.
    #[error("header name is not a token")]
    Name,
    /// The value has a control byte (anything below 0x20 but HTAB, or 0x7f).
    #[error("header value contains a control byte")]
    Value,
}

/// A header field name: a non-empty RFC 9110 token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeaderName<'a>(&'a [u8]);

impl HeaderName<'static> {
    /// A name known at compile time. Used in a `const`, a bad name fails the build.
    ///
    /// # Panics
    /// `name` is empty or not a token (at compile time when evaluated in a `const`).
    pub const fn from_static(name: &'static str) -> HeaderName<'static> {
        let b = name.as_bytes();
        assert!(!b.is_empty(), "empty header name");
        let mut i = 0;
        while i < b.len() {
            assert!(is_tchar(b[i]), "header name is not a token");
            i += 1;
        }
        HeaderName(b)
    }
}

impl<'a> HeaderName<'a> {
    /// A name from elsewhere (a parsed response being relayed).
    ///
    /// # Errors
    /// [`InvalidHeader::Name`] if `name` is empty or not a token.
    pub fn new(name: &'a [u8]) -> Result<HeaderName<'a>, InvalidHeader> {
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return Err(InvalidHeader::Name);
        }
        Ok(HeaderName(name))
    }

    /// The name's bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.0
    }
}

/// A header field value with no byte that could end the field or the head: no control byte but
/// HTAB (so no CR, LF or NUL), no DEL. obs-text (0x80 and up) is kept, as httparse keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeaderValue<'a>(&'a [u8]);

impl<'a> HeaderValue<'a> {
    /// Check `value`.
    ///
    /// # Errors
    /// [`InvalidHeader::Value`] if it has a control byte.
    pub fn new(value: &'a [u8]) -> Result<HeaderValue<'a>, InvalidHeader> {
        if value.iter().all(|&b| is_value_byte(b)) {
            Ok(HeaderValue(value))
        } else {
            Err(InvalidHeader::Value)
        }
    }

    /// A value known at compile time.
    ///
    /// # Panics
    /// `value` has a control byte (at compile time when evaluated in a `const`).
    pub const fn from_static(value: &'static str) -> HeaderValue<'static> {
        let b = value.as_bytes();
        let mut i = 0;
        while i < b.len() {
            assert!(is_value_byte(b[i]), "control byte in a header value");
            i += 1;
        }
        HeaderValue(b)
    }

    /// The value's bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.0
    }
}

const fn is_tchar(b: u8) -> bool {
    matches!(b,
        b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_' | b'`'
        | b'|' | b'~' | b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z')
}

const fn is_value_byte(b: u8) -> bool {
    b == b'\t' || (b >= 0x20 && b != 0x7f)
}

/// `Content-Length`.
pub const CONTENT_LENGTH: HeaderName<'static> = HeaderName::from_static("Content-Length");
/// `Content-Type`.
pub const CONTENT_TYPE: HeaderName<'static> = HeaderName::from_static("Content-Type");
/// `Connection`.
pub const CONNECTION: HeaderName<'static> = HeaderName::from_static("Connection");
/// The `Content-Type` of generated plain-text pages.
pub const TEXT_PLAIN: HeaderValue<'static> = HeaderValue::from_static("text/plain; charset=UTF-8");

/// Append `Name: value\r\n`.
pub fn put_header(out: &mut Vec<u8>, name: HeaderName<'_>, value: HeaderValue<'_>) {
    out.reserve(name.0.len() + value.0.len() + 4);
    out.extend_from_slice(name.0);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.0);
    out.extend_from_slice(b"\r\n");
}

/// Append `Content-Length: <n>\r\n`.
pub fn put_content_length(out: &mut Vec<u8>, n: u64) {
    put_number(out, CONTENT_LENGTH, n);
}

/// Append `Name: <n>\r\n`, `n` in decimal (digits only, so no check is needed).
pub fn put_number(out: &mut Vec<u8>, name: HeaderName<'_>, n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut v = n;
    loop {
        i -= 1;
        // `v % 10` is below 10: the cast cannot truncate.
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    put_header(out, name, HeaderValue(&digits[i..]));
}

/// Append `HTTP/1.1 <status> <reason>\r\n` (the status as three digits).
pub fn put_status_line(out: &mut Vec<u8>, status: u16, reason: HeaderValue<'_>) {
    let s = status.min(999);
    out.extend_from_slice(b"HTTP/1.1 ");
    // Each digit is below 10: the casts cannot truncate.
    out.extend_from_slice(&[
        b'0' + (s / 100 % 10) as u8,
        b'0' + (s / 10 % 10) as u8,
        b'0' + (s % 10) as u8,
        b' ',
    ]);
    out.extend_from_slice(reason.0);
    out.extend_from_slice(b"\r\n");
}

/// A generated answer, whole: the status line with [`super::reason`], `Content-Type`,
/// `Content-Length` of `body`, `Connection: close` when `close`, then the body, which is left
/// out when the request was HEAD (same head, no body bytes: RFC 9110 §9.3.2). Every page the
/// agent and the API make up themselves is written here.
pub fn write_answer(
    out: &mut Vec<u8>,
    status: u16,
    content_type: HeaderValue<'_>,
    body: &[u8],
    is_head: bool,
    close: bool,
) {
    write_answer_with(out, status, content_type, &[], body, is_head, close);
}

/// [`write_answer`] with `extra` headers after `Content-Type` (the proxy's
/// IMDSv2 token answer echoes its TTL).
pub fn write_answer_with(
    out: &mut Vec<u8>,
    status: u16,
    content_type: HeaderValue<'_>,
    extra: &[(HeaderName<'_>, HeaderValue<'_>)],
    body: &[u8],
    is_head: bool,
    close: bool,
) {
    put_status_line(out, status, HeaderValue::from_static(super::reason(status)));
    put_header(out, CONTENT_TYPE, content_type);
    for (n, v) in extra {
        put_header(out, *n, *v);
    }
    put_content_length(out, body.len() as u64);
    if close {
        put_header(out, CONNECTION, HeaderValue::from_static("close"));
    }
    out.extend_from_slice(b"\r\n");
    if !is_head {
        out.extend_from_slice(body);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{parse_response, Limits, ResponseBody};

    #[test]
    fn values_with_control_bytes_are_refused() {
        for bad in [
            &b"a\rb"[..],
            b"a\nb",
            b"a\0b",
            b"\x1b[31m",
            b"x\x7f",
            b"x\r\n\r\nGET / HTTP/1.1",
        ] {
            assert_eq!(HeaderValue::new(bad), Err(InvalidHeader::Value), "{bad:?}");
        }
        for good in [&b""[..], b"a b\tc", b"caf\xc3\xa9", b"!~"] {
            assert_eq!(HeaderValue::new(good).map(|v| v.as_bytes()), Ok(good));
        }
        // Every byte, exhaustively.
        for b in 0u8..=255 {
            let ok = HeaderValue::new(&[b]).is_ok();
            assert_eq!(ok, b == b'\t' || (b >= 0x20 && b != 0x7f), "{b:#x}");
        }
    }

    #[test]
    fn names_must_be_tokens() {
        for bad in [&b""[..], b"X Y", b"X:", b"X\r\n", b"\xc3\xa9", b"(x)"] {
            assert_eq!(HeaderName::new(bad), Err(InvalidHeader::Name), "{bad:?}");
        }
        assert!(HeaderName::new(b"X-Instance-ID").is_ok());
        assert_eq!(CONTENT_LENGTH.as_bytes(), b"Content-Length");
    }

    #[test]
    fn content_length_digits() {
        for n in [0u64, 7, 10, 1234, u64::MAX] {
            let mut out = Vec::new();
            put_content_length(&mut out, n);
            assert_eq!(out, format!("Content-Length: {n}\r\n").as_bytes());
        }
    }

    #[test]
    fn head_answers_keep_the_length_and_drop_the_body() {
        for close in [false, true] {
            let mut get = Vec::new();
            write_answer(&mut get, 404, TEXT_PLAIN, b"not here\n", false, close);
            let mut head = Vec::new();
            write_answer(&mut head, 404, TEXT_PLAIN, b"not here\n", true, close);
            assert!(get.starts_with(&head), "same head");
            assert_eq!(&get[head.len()..], b"not here\n");
            let h = parse_response(&head, &Limits::default(), true)
                .unwrap()
                .unwrap();
            assert_eq!(h.head_len, head.len(), "no body bytes after a HEAD");
            assert_eq!(h.status, 404);
            let g = parse_response(&get, &Limits::default(), false)
                .unwrap()
                .unwrap();
            assert_eq!(g.body, ResponseBody::Length(9));
            assert_eq!(g.keep_alive, !close);
        }
    }
}
