//! Canned responses the proxy writes itself, as `&'static [u8]`.
//!
//! Errors are answered from static bytes so the error path allocates nothing and cannot fail
//! half-way (habit 3). Every canned response closes the connection: after a refused request the
//! stream position is not trustworthy (an unread body, a smuggling attempt), so keep-alive is never
//! offered. The bodies are the reason phrase plus a newline, like haproxy's plain-text errors.
//! Content-Length is written by hand in each literal (`concat!` cannot compute it); a test checks
//! every one.

/// Interim response sent before reading a body when the client asked for `Expect: 100-continue`.
pub const CONTINUE_100: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

macro_rules! canned_response {
    ($code:literal, $reason:literal, $len:literal) => {
        canned_response!($code, $reason, $len, "")
    };
    ($code:literal, $reason:literal, $len:literal, $extra:literal) => {
        concat!(
            "HTTP/1.1 ",
            $code,
            " ",
            $reason,
            "\r\nContent-Type: text/plain; charset=UTF-8\r\nContent-Length: ",
            $len,
            "\r\n",
            $extra,
            "Connection: close\r\n\r\n",
            $reason,
            "\n"
        )
        .as_bytes()
    };
}

const R400: &[u8] = canned_response!(400, "Bad Request", 12);
const R401: &[u8] = canned_response!(401, "Unauthorized", 13);
const R403: &[u8] = canned_response!(403, "Forbidden", 10);
const R404: &[u8] = canned_response!(404, "Not Found", 10);
// RFC 9110 §15.5.6: a 405 MUST carry Allow.
const R405: &[u8] = canned_response!(
    405,
    "Method Not Allowed",
    19,
    "Allow: GET, HEAD, POST, PUT\r\n"
);
const R408: &[u8] = canned_response!(408, "Request Timeout", 16);
const R413: &[u8] = canned_response!(413, "Content Too Large", 18);
const R429: &[u8] = canned_response!(429, "Too Many Requests", 18);
const R431: &[u8] = canned_response!(431, "Request Header Fields Too Large", 32);
const R500: &[u8] = canned_response!(500, "Internal Server Error", 22);
const R501: &[u8] = canned_response!(501, "Not Implemented", 16);
const R502: &[u8] = canned_response!(502, "Bad Gateway", 12);
const R503: &[u8] = canned_response!(503, "Service Unavailable", 20);
const R504: &[u8] = canned_response!(504, "Gateway Timeout", 16);

/// Full `Connection: close` response for `status`, with a plain-text body of the reason phrase.
///
/// Covers 400, 401, 403, 404, 405, 408, 413, 429, 431, 500, 501, 502, 503 and 504; any other
/// status gets the 500 response.
pub fn canned(status: u16) -> &'static [u8] {
    match status {
        400 => R400,
        401 => R401,
        403 => R403,
        404 => R404,
        405 => R405,
        408 => R408,
        413 => R413,
        429 => R429,
        431 => R431,
        500 => R500,
        501 => R501,
        502 => R502,
        503 => R503,
        504 => R504,
        _ => R500,
    }
}

/// [`canned`] framed for the request's method: after a HEAD, the same head without the body
/// (RFC 9110 §9.3.2). A client that sent HEAD does not read a body, so the body bytes of a
/// full page would be taken as the start of the next answer on a kept connection.
pub fn canned_for(status: u16, is_head: bool) -> &'static [u8] {
    let full = canned(status);
    if !is_head {
        return full;
    }
    match full.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(end) => &full[..end + 4],
        None => full,
    }
}

/// Reason phrase for `status` (RFC 9110 wording); `"Unknown"` for codes not listed.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        300 => "Multiple Choices",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        417 => "Expectation Failed",
        422 => "Unprocessable Content",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{parse_response, Limits, ResponseBody};

    const CODES: [u16; 14] = [
        400, 401, 403, 404, 405, 408, 413, 429, 431, 500, 501, 502, 503, 504,
    ];

    #[test]
    fn every_canned_response_is_well_framed() {
        for code in CODES {
            let bytes = canned(code);
            let head = parse_response(bytes, &Limits::default(), false)
                .unwrap()
                .unwrap_or_else(|| panic!("{code}: incomplete"));
            assert_eq!(head.status, code);
            assert_eq!(head.reason.get(bytes), reason(code).as_bytes());
            let body = &bytes[head.head_len..];
            assert_eq!(
                head.body,
                ResponseBody::Length(body.len() as u64),
                "{code}: Content-Length"
            );
            assert_eq!(body, format!("{}\n", reason(code)).as_bytes());
            assert!(!head.keep_alive, "{code}");
            assert_eq!(
                head.header(bytes, "content-type"),
                Some(&b"text/plain; charset=UTF-8"[..])
            );
        }
        let allow = parse_response(canned(405), &Limits::default(), false)
            .unwrap()
            .unwrap();
        assert_eq!(
            allow.header(canned(405), "allow"),
            Some(&b"GET, HEAD, POST, PUT"[..])
        );
    }

    #[test]
    fn head_variants_are_the_same_head_without_the_body() {
        for code in CODES {
            let full = canned_for(code, false);
            let head = canned_for(code, true);
            assert_eq!(full, canned(code));
            assert!(full.starts_with(head));
            let h = parse_response(head, &Limits::default(), true)
                .unwrap()
                .unwrap();
            assert_eq!(h.head_len, head.len(), "{code}: no body after HEAD");
            assert_eq!(
                &full[head.len()..],
                format!("{}\n", reason(code)).as_bytes()
            );
        }
    }

    #[test]
    fn fallback_is_500() {
        assert_eq!(canned(418), canned(500));
        assert_eq!(canned(0), canned(500));
        assert!(canned(500).starts_with(b"HTTP/1.1 500 Internal Server Error\r\n"));
    }

    #[test]
    fn continue_100() {
        let head = parse_response(CONTINUE_100, &Limits::default(), false)
            .unwrap()
            .unwrap();
        assert_eq!(head.status, 100);
        assert_eq!(head.head_len, CONTINUE_100.len());
        assert_eq!(head.body, ResponseBody::None);
    }
}
