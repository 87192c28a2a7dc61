//! JSON text identical to Nova's `jsonutils.dump_as_bytes`, i.e. Python's
//! `json.dumps` with default arguments: `", "` and `": "` separators, keys in
//! insertion order, `ensure_ascii` (everything outside `' '..='~'` escaped as
//! lowercase `\uXXXX`, astral characters as surrogate pairs), floats as
//! Python's `repr`.
//!
//! A tiny ordered value type rather than `serde_json::to_string`: serde_json's
//! compact format has no spaces and its `Map` is sorted unless the
//! `preserve_order` feature is on, and Nova's key order is part of the bytes we
//! want to match. (Cargo.toml turns `preserve_order` on, so an operator's
//! document in [`Json::Value`] keeps the key order of its file, as in Nova.)

use std::fmt::Write as _;

/// An ordered JSON value.
#[derive(Debug, Clone)]
pub(crate) enum Json {
    Null,
    /// The documents with integers and arrays are written straight into
    /// their buffers ([`Obj`], [`Arr`]); the tests' oracles still build them.
    #[cfg(test)]
    Int(i64),
    Str(String),
    #[cfg(test)]
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
    /// An operator-supplied document (vendor data), rendered in its own key order.
    Value(serde_json::Value),
}

impl Json {
    pub(crate) fn str(s: impl Into<String>) -> Json {
        Json::Str(s.into())
    }

    /// Render as Python's `json.dumps` would.
    pub(crate) fn to_python_string(&self) -> String {
        let mut out = String::with_capacity(256);
        self.write(&mut out);
        out
    }

    fn write(&self, out: &mut String) {
        match self {
            Json::Null => out.push_str("null"),
            #[cfg(test)]
            Json::Int(i) => {
                let _ = write!(out, "{i}");
            }
            Json::Str(s) => write_str(out, s),
            #[cfg(test)]
            Json::Arr(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    v.write(out);
                }
                out.push(']');
            }
            Json::Obj(members) => {
                out.push('{');
                for (i, (k, v)) in members.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write_str(out, k);
                    out.push_str(": ");
                    v.write(out);
                }
                out.push('}');
            }
            Json::Value(v) => write_value(out, v),
        }
    }
}

/// An object written straight into the output, for a document whose shape
/// the code knows (`meta_data.json`): no tree of owned keys and values in
/// between. [`Obj::key`] writes the separator and the key and hands back
/// the output for the value; [`Obj::end`] closes it.
pub(crate) struct Obj<'o> {
    out: &'o mut String,
    empty: bool,
}

impl<'o> Obj<'o> {
    pub(crate) fn new(out: &'o mut String) -> Obj<'o> {
        out.push('{');
        Obj { out, empty: true }
    }

    /// Start member `k`; its value is written to what this returns.
    pub(crate) fn key(&mut self, k: &str) -> &mut String {
        if !std::mem::take(&mut self.empty) {
            self.out.push_str(", ");
        }
        write_str(self.out, k);
        self.out.push_str(": ");
        self.out
    }

    pub(crate) fn end(self) {
        self.out.push('}');
    }
}

/// An array written straight into the output; see [`Obj`].
pub(crate) struct Arr<'o> {
    out: &'o mut String,
    empty: bool,
}

impl<'o> Arr<'o> {
    pub(crate) fn new(out: &'o mut String) -> Arr<'o> {
        out.push('[');
        Arr { out, empty: true }
    }

    /// Start the next item; it is written to what this returns.
    pub(crate) fn item(&mut self) -> &mut String {
        if !std::mem::take(&mut self.empty) {
            self.out.push_str(", ");
        }
        self.out
    }

    pub(crate) fn end(self) {
        self.out.push(']');
    }
}

/// A string value, escaped as Python's `json.dumps` does.
pub(crate) fn str_to(out: &mut String, s: &str) {
    write_str(out, s);
}

/// A string value or `null`.
pub(crate) fn opt_str_to(out: &mut String, s: Option<&str>) {
    match s {
        Some(s) => write_str(out, s),
        None => out.push_str("null"),
    }
}

/// An integer value.
pub(crate) fn int_to(out: &mut String, i: i64) {
    let _ = write!(out, "{i}");
}

fn write_value(out: &mut String, v: &serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                let _ = write!(out, "{i}");
            } else if let Some(u) = n.as_u64() {
                let _ = write!(out, "{u}");
            } else if let Some(f) = n.as_f64() {
                out.push_str(&py_float_repr(f));
            } else {
                out.push_str("null");
            }
        }
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_str(out, k);
                out.push_str(": ");
                write_value(out, item);
            }
            out.push('}');
        }
    }
}

/// Whether `b` goes out as itself (printable ASCII other than `"` and `\\`).
fn is_plain(b: u8) -> bool {
    matches!(b, b' '..=b'~') && b != b'"' && b != b'\\'
}

/// How many bytes at the start of `b` are plain: eight at a time while a
/// whole word is (SWAR: each test below is exact about whether *some* byte
/// of the word matches), then byte by byte. Scanning one byte at a time
/// was still 6.5 instructions per byte, half of `write_str`'s cost.
fn plain_prefix(b: &[u8]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    /// Some byte of `v` is zero.
    fn has_zero(v: u64) -> bool {
        v.wrapping_sub(ONES) & !v & HIGH != 0
    }
    let mut at = 0;
    for chunk in b.chunks_exact(8) {
        // A chunk is always 8 bytes; a zero word would count as not plain.
        let w = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
        let control = w.wrapping_sub(ONES * 0x20) & !w & HIGH != 0; // some byte < 0x20
        let above = (w.wrapping_add(ONES) | w) & HIGH != 0; // some byte > 0x7e
        if control
            || above
            || has_zero(w ^ (ONES * u64::from(b'"')))
            || has_zero(w ^ (ONES * u64::from(b'\\')))
        {
            break;
        }
        at += 8;
    }
    at + b[at..]
        .iter()
        .position(|&c| !is_plain(c))
        .unwrap_or(b.len() - at)
}

/// One string, escaped as Python's `py_encode_basestring_ascii`. Runs of plain bytes are copied
/// whole: the render's strings are mostly plain (a `random_seed` alone is
/// 684 base64 characters), and pushing them one `char` at a time was a third
/// of the API's instructions per `meta_data.json` (callgrind,
/// `scripts/instructions-daemons.sh 2000 api`: 25 751 of 75 264).
fn write_str(out: &mut String, s: &str) {
    out.push('"');
    let mut rest = s;
    while !rest.is_empty() {
        let plain = plain_prefix(rest.as_bytes());
        // A non-plain byte is never inside a plain run, and every plain byte
        // is ASCII, so `plain` is a char boundary.
        out.push_str(&rest[..plain]);
        rest = &rest[plain..];
        let Some(c) = rest.chars().next() else { break };
        rest = &rest[c.len_utf8()..];
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{u:04x}");
                }
            }
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: shortest round-trip digits, fixed notation for
/// decimal exponents in `-4..16`, otherwise `d.ddde+XX`.
fn py_float_repr(f: f64) -> String {
    if !f.is_finite() {
        // json.dumps would write NaN/Infinity; serde_json cannot hold them.
        return "null".to_owned();
    }
    let sci = format!("{f:e}");
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (neg, mant) = match mant.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mant),
    };
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    let mut out = String::new();
    if neg {
        out.push('-');
    }
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let int_len = usize::try_from(exp).unwrap_or(0) + 1;
            if digits.len() > int_len {
                out.push_str(&digits[..int_len]);
                out.push('.');
                out.push_str(&digits[int_len..]);
            } else {
                out.push_str(&digits);
                out.push_str(&"0".repeat(int_len - digits.len()));
                out.push_str(".0");
            }
        } else {
            out.push_str("0.");
            out.push_str(&"0".repeat(usize::try_from(-exp - 1).unwrap_or(0)));
            out.push_str(&digits);
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(
            out,
            "e{}{:02}",
            if exp < 0 { '-' } else { '+' },
            exp.unsigned_abs()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_separators_and_order() {
        let j = Json::Obj(vec![
            ("z".into(), Json::Int(1)),
            ("a".into(), Json::Arr(vec![Json::Null, Json::str("x")])),
            ("e".into(), Json::Arr(vec![])),
            ("o".into(), Json::Obj(vec![])),
        ]);
        assert_eq!(
            j.to_python_string(),
            r#"{"z": 1, "a": [null, "x"], "e": [], "o": {}}"#
        );
    }

    #[test]
    fn ensure_ascii_escapes() {
        let s = Json::str("é\u{1F600}\"\\\n\r\t\u{8}\u{c}\u{1}\u{7f}/~");
        assert_eq!(
            s.to_python_string(),
            r#""\u00e9\ud83d\ude00\"\\\n\r\t\b\f\u0001\u007f/~""#
        );
    }

    /// The escaping as it was written first, one `char` at a time: the
    /// oracle for the run-copying [`write_str`].
    fn naive_write_str(out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                ' '..='~' => out.push(c),
                _ => {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        let _ = write!(out, "\\u{u:04x}");
                    }
                }
            }
        }
        out.push('"');
    }

    proptest::proptest! {
        #[test]
        fn escaping_matches_the_char_by_char_oracle(s in "(\\PC|[\"\\\\\u{0}-\u{1f}\u{7f}-\u{ff}]|[ -~]{0,40}){0,60}") {
            let (mut fast, mut slow) = (String::new(), String::new());
            write_str(&mut fast, &s);
            naive_write_str(&mut slow, &s);
            proptest::prop_assert_eq!(fast, slow);
        }
    }

    #[test]
    fn every_special_byte_is_found_at_every_offset_of_a_word() {
        let specials = (0u8..0x20)
            .chain([b'"', b'\\', 0x7f])
            .map(char::from)
            .chain(['\u{80}', '\u{ff}', '\u{1F600}']);
        for special in specials {
            for at in 0..17 {
                let mut s = "a".repeat(at);
                s.push(special);
                s.push_str(&"z".repeat(20 - at));
                let (mut fast, mut slow) = (String::new(), String::new());
                write_str(&mut fast, &s);
                naive_write_str(&mut slow, &s);
                assert_eq!(fast, slow, "{special:?} at {at}");
            }
        }
    }

    #[test]
    fn floats_like_python_repr() {
        for (f, py) in [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (-0.0, "-0.0"),
            (123.456, "123.456"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (1e15, "1000000000000000.0"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.25e-7, "1.25e-07"),
            (1e100, "1e+100"),
        ] {
            assert_eq!(py_float_repr(f), py, "{f}");
        }
    }

    #[test]
    fn serde_values() {
        let v: serde_json::Value =
            serde_json::from_str(r#"{"b": [true, false, null, 1.5, -3], "a": "ü"}"#).unwrap();
        // File order, as Python's json.load + json.dumps keeps it (preserve_order).
        assert_eq!(
            Json::Value(v).to_python_string(),
            r#"{"b": [true, false, null, 1.5, -3], "a": "\u00fc"}"#
        );
    }
}
