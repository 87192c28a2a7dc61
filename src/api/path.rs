//! Request-target → normalised path segments, the way Nova sees `PATH_INFO`.
//!
//! Nova gets the percent-decoded path from the WSGI server and runs
//! `posixpath.normpath` on it: empty and `.` segments vanish, `..` pops (never
//! above the root), so trailing and repeated slashes do not matter. The query
//! string is ignored. One deliberate difference: `normpath` keeps a leading
//! `//`, which makes Nova answer `//latest/meta-data` with the EC2 version
//! list; we collapse it like any other repeated slash, as the spec's rule says.

use smallvec::SmallVec;

/// Upper bound on path segments; longer paths cannot name anything we serve.
const MAX_SEGMENTS: usize = 64;

/// Segments kept on the stack: every path we serve has at most six.
pub(crate) type Segments<'a> = SmallVec<[&'a str; 8]>;

/// Normalised, decoded segments of the request path (`[]` for `/`), or `None`
/// if the path is not valid UTF-8 after decoding or absurdly deep (→ 404).
///
/// The segments borrow `target`, or `scratch` when the path has a `%` to
/// decode: a request costs no allocation here unless it is percent-encoded
/// or deeper than eight segments.
pub(crate) fn normalize<'a>(target: &'a [u8], scratch: &'a mut String) -> Option<Segments<'a>> {
    let path = strip_origin(target);
    let path = match path.iter().position(|&b| b == b'?' || b == b'#') {
        Some(i) => &path[..i],
        None => path,
    };
    let decoded: &'a str = if path.contains(&b'%') {
        *scratch = String::from_utf8(percent_decode(path)).ok()?;
        scratch
    } else {
        std::str::from_utf8(path).ok()?
    };
    let mut segs = Segments::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segs.pop();
            }
            s => {
                if segs.len() == MAX_SEGMENTS {
                    return None;
                }
                segs.push(s);
            }
        }
    }
    Some(segs)
}

/// Absolute-form targets (`http://host/path`) → the path part.
fn strip_origin(target: &[u8]) -> &[u8] {
    for scheme in [&b"http://"[..], b"https://"] {
        if target.len() >= scheme.len() && target[..scheme.len()].eq_ignore_ascii_case(scheme) {
            let rest = &target[scheme.len()..];
            return match rest.iter().position(|&b| b == b'/') {
                Some(i) => &rest[i..],
                None => b"/",
            };
        }
    }
    target
}

fn percent_decode(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' && i + 2 < s.len() {
            if let (Some(h), Some(l)) = (hex(s[i + 1]), hex(s[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Option<Vec<String>> {
        let mut scratch = String::new();
        normalize(s.as_bytes(), &mut scratch).map(|v| v.iter().map(|s| (*s).to_owned()).collect())
    }

    fn segs(v: &[&str]) -> Option<Vec<String>> {
        Some(v.iter().map(|s| (*s).to_owned()).collect())
    }

    #[test]
    fn normpath_cases() {
        assert_eq!(n("/"), segs(&[]));
        assert_eq!(n(""), segs(&[]));
        assert_eq!(n("/foo/../"), segs(&[]));
        assert_eq!(n("/../.."), segs(&[]));
        assert_eq!(n("//latest///meta-data/"), segs(&["latest", "meta-data"]));
        assert_eq!(
            n("/latest/meta-data/../meta-data/hostname"),
            segs(&["latest", "meta-data", "hostname"])
        );
        assert_eq!(
            n("/latest/./meta-data/?foo=bar/../x"),
            segs(&["latest", "meta-data"])
        );
        assert_eq!(n("/latest/meta%2ddata"), segs(&["latest", "meta-data"]));
        assert_eq!(n("/latest/%2e%2e/"), segs(&[]));
        assert_eq!(n("/a%zz%4"), segs(&["a%zz%4"]));
        assert_eq!(n("/a%ff"), None);
        assert_eq!(n("http://169.254.169.254/latest/?x"), segs(&["latest"]));
        assert_eq!(n("http://169.254.169.254"), segs(&[]));
        assert_eq!(n(&"/a".repeat(65)), None);
        assert_eq!(n(&"/a".repeat(64)).map(|v| v.len()), Some(64));
        assert_eq!(
            n("/latest/\u{e9}t\u{e9}"),
            segs(&["latest", "\u{e9}t\u{e9}"])
        );
        assert_eq!(n("/latest/\u{e9}%2ft"), segs(&["latest", "\u{e9}", "t"]));
    }
}
