//! JSON-RPC 1.0 framing as OVSDB uses it: concatenated JSON values, no
//! delimiter, no length prefix (RFC 7047 section 4).
//!
//! [`Decoder`] is fed whatever the socket returned and hands out complete
//! top-level values. It scans incrementally (string/escape state and nesting
//! depth are kept between reads), so a multi-megabyte initial snapshot
//! arriving in 64 KiB reads is scanned once and parsed once, not re-parsed
//! from its start on every read as a retry-`serde_json::StreamDeserializer`
//! loop would. Once the scanner has found the end of a value, that slice is
//! parsed by `serde_json`, which also validates it.
//!
//! Bounds: a value may not exceed `max_bytes` (checked before the buffer
//! grows), nor nest deeper than [`MAX_DEPTH`] (checked by the scanner, so a
//! hostile `[[[[...` is refused long before `serde_json`'s own recursion
//! limit). Top-level values must be objects, as every JSON-RPC message is.
//!
//! Rejected: `serde_json::StreamDeserializer` over the buffer (it cannot
//! resume a partial value, so each read re-parses from the start: quadratic
//! in the message size); a framing of our own on newlines (ovsdb-server does
//! not send them).

use serde_json::Value;

/// Deepest nesting of arrays/objects accepted. OVSDB's deepest message is
/// about 8 levels (`result` -> table -> row -> column -> `["set", [["uuid", ..]]]`).
pub const MAX_DEPTH: usize = 64;

/// A framing or parse error: the connection cannot continue.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// A single message is larger than the limit.
    #[error("message larger than {0} bytes")]
    TooLarge(usize),
    /// Nesting deeper than [`MAX_DEPTH`].
    #[error("message nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// A top-level value that is not an object.
    #[error("top-level JSON value is not an object (byte {0:#04x})")]
    NotObject(u8),
    /// Not valid JSON.
    #[error("invalid JSON: {0}")]
    Json(String),
}

/// The streaming decoder. See the module doc.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already scanned (all belong to the current value).
    scanned: usize,
    /// Where the current value starts in `buf` (after leading whitespace).
    start: Option<usize>,
    depth: usize,
    in_string: bool,
    escape: bool,
    max_bytes: usize,
}

impl Decoder {
    /// A decoder that refuses any single message above `max_bytes`.
    pub fn new(max_bytes: usize) -> Self {
        Self {
            buf: Vec::new(),
            scanned: 0,
            start: None,
            depth: 0,
            in_string: false,
            escape: false,
            max_bytes,
        }
    }

    /// How many more bytes may be fed; the caller reads at most this many.
    /// Zero with no complete message buffered means the current message is
    /// at the limit ([`Decoder::next_value`] then says so).
    pub fn room(&self) -> usize {
        self.max_bytes.saturating_sub(self.buf.len())
    }

    /// Append bytes read from the socket. Every complete message must have
    /// been taken out with [`Decoder::next_value`] first.
    ///
    /// # Errors
    /// The buffer would exceed the limit.
    pub fn feed(&mut self, data: &[u8]) -> Result<(), FrameError> {
        if self.buf.len() + data.len() > self.max_bytes {
            return Err(FrameError::TooLarge(self.max_bytes));
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    /// The next complete message, if the buffer holds one.
    ///
    /// # Errors
    /// Framing or JSON errors; the decoder must then be dropped.
    pub fn next_value(&mut self) -> Result<Option<Value>, FrameError> {
        if self.start.is_none() {
            let skip = self
                .buf
                .iter()
                .take_while(|b| b.is_ascii_whitespace())
                .count();
            self.buf.drain(..skip);
            self.scanned = 0;
            match self.buf.first() {
                None => return Ok(None),
                Some(b'{') => self.start = Some(0),
                Some(&b) => return Err(FrameError::NotObject(b)),
            }
        }
        let mut end = None;
        for (i, &b) in self.buf.iter().enumerate().skip(self.scanned) {
            if self.in_string {
                if self.escape {
                    self.escape = false;
                } else if b == b'\\' {
                    self.escape = true;
                } else if b == b'"' {
                    self.in_string = false;
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => {
                    self.depth += 1;
                    if self.depth > MAX_DEPTH {
                        return Err(FrameError::TooDeep);
                    }
                }
                b'}' | b']' => {
                    // A stray closer at depth 0 cannot happen: we start on '{'.
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        end = Some(i + 1);
                        break;
                    }
                }
                _ => {}
            }
        }
        let Some(end) = end else {
            self.scanned = self.buf.len();
            if self.buf.len() >= self.max_bytes {
                return Err(FrameError::TooLarge(self.max_bytes));
            }
            return Ok(None);
        };
        let value = serde_json::from_slice::<Value>(&self.buf[..end])
            .map_err(|e| FrameError::Json(e.to_string()))?;
        self.buf.drain(..end);
        self.scanned = 0;
        self.start = None;
        self.depth = 0;
        self.in_string = false;
        self.escape = false;
        Ok(Some(value))
    }

    /// Bytes buffered and not yet handed out.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn all(dec: &mut Decoder) -> Vec<Value> {
        let mut out = Vec::new();
        while let Some(v) = dec.next_value().unwrap() {
            out.push(v);
        }
        out
    }

    #[test]
    fn concatenated_values_without_delimiters() {
        let mut dec = Decoder::new(1024);
        dec.feed(br#"{"id":1,"result":"a}"}{"id":2,"result":["{\"x"]} {"method":"echo","params":[],"id":"echo"}"#)
            .unwrap();
        let got = all(&mut dec);
        assert_eq!(
            got,
            vec![
                json!({"id":1,"result":"a}"}),
                json!({"id":2,"result":["{\"x"]}),
                json!({"method":"echo","params":[],"id":"echo"}),
            ]
        );
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn every_split_point_gives_the_same_values() {
        let input: &[u8] =
            br#"{"a":"\\\"}{","b":[1,2,{"c":null}]}  {"id":"echo","result":["x\u005d"],"error":null}"#;
        let mut whole = Decoder::new(1024);
        whole.feed(input).unwrap();
        let want = all(&mut whole);
        assert_eq!(want.len(), 2);
        for split in 0..=input.len() {
            for split2 in split..=input.len() {
                let mut dec = Decoder::new(1024);
                let mut got = Vec::new();
                for part in [&input[..split], &input[split..split2], &input[split2..]] {
                    dec.feed(part).unwrap();
                    got.extend(all(&mut dec));
                }
                assert_eq!(got, want, "split at {split}/{split2}");
            }
        }
    }

    #[test]
    fn byte_at_a_time() {
        let input = br#"{"method":"update3","params":["m","00000000-0000-0000-0000-000000000000",{"T":{"u":{"modify":{"c":["set",[]]}}}}],"id":null}"#;
        let mut dec = Decoder::new(4096);
        let mut got = Vec::new();
        for b in input.iter() {
            dec.feed(std::slice::from_ref(b)).unwrap();
            got.extend(all(&mut dec));
        }
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["method"], "update3");
    }

    #[test]
    fn deep_nesting_is_refused_early() {
        let mut dec = Decoder::new(1 << 20);
        let mut hostile = b"{\"a\":".to_vec();
        hostile.extend(std::iter::repeat_n(b'[', 100_000));
        dec.feed(&hostile).unwrap();
        assert_eq!(dec.next_value(), Err(FrameError::TooDeep));
    }

    #[test]
    fn huge_string_is_refused_at_the_bound() {
        let max = 64 * 1024;
        let mut dec = Decoder::new(max);
        dec.feed(b"{\"result\":\"").unwrap();
        let chunk = vec![b'x'; 4096];
        let mut err = None;
        for _ in 0..100 {
            // As the connection does: never read more than `room()`.
            let n = dec.room().min(chunk.len());
            if let Err(e) = dec
                .feed(&chunk[..n])
                .and_then(|()| dec.next_value().map(|_| ()))
            {
                err = Some(e);
                break;
            }
            assert!(dec.buffered() <= max, "buffer grew past the bound");
        }
        assert_eq!(err, Some(FrameError::TooLarge(max)));
    }

    #[test]
    fn a_message_of_exactly_the_limit_passes() {
        let msg = br#"{"id":1,"result":"abc"}"#;
        let mut dec = Decoder::new(msg.len());
        dec.feed(msg).unwrap();
        assert_eq!(
            dec.next_value().unwrap(),
            Some(json!({"id":1,"result":"abc"}))
        );
        let mut dec = Decoder::new(msg.len() - 1);
        let r = dec.feed(msg).and_then(|()| dec.next_value().map(|_| ()));
        assert_eq!(r, Err(FrameError::TooLarge(msg.len() - 1)));
    }

    #[test]
    fn non_object_and_bad_json_are_errors() {
        let mut dec = Decoder::new(1024);
        dec.feed(b"[1,2]").unwrap();
        assert_eq!(dec.next_value(), Err(FrameError::NotObject(b'[')));
        let mut dec = Decoder::new(1024);
        dec.feed(b"{\"a\" 1}").unwrap();
        assert!(matches!(dec.next_value(), Err(FrameError::Json(_))));
    }
}
