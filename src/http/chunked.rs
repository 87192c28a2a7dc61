//! Streaming chunked transfer coding (RFC 9112 §7.1) that survives arbitrary read splits.
//!
//! The proxy forwards chunked bodies unchanged, so the common job is only to find where the
//! message ends ([`ChunkedScanner::scan`]); the agent and API, which need the payload, use
//! [`ChunkedScanner::decode`]. Both run the same byte-level state machine, which keeps no input
//! bytes of its own: whatever a read returned is fed in, and the state carries across calls, so no
//! buffer has to hold a whole size line or trailer. Payload bytes are skipped or copied in bulk.
//!
//! Everything is bounded: the decoded payload by `max_body_bytes` (413, reported as soon as a
//! chunk size would pass it, before its data arrives), a size line including extensions by
//! [`MAX_CHUNK_LINE_BYTES`], the trailer section by [`MAX_TRAILER_BYTES`], and all framing
//! bytes of one message together by `max(max_body_bytes, MIN_CHUNK_FRAMING_BYTES)` (413), so
//! the raw message a caller buffers is at most about twice the payload limit. Without that last
//! bound, one-byte chunks with 4 KiB extensions carry a 64 KiB payload in 256 MiB. Hex sizes that overflow
//! `u64` are a `BadChunk`, not a panic. Bare LF is accepted as a line end (as httparse does for
//! heads); a bare CR is not. Rejected: httparse's `parse_chunk_size`, which needs the whole size
//! line in one slice and so would force buffering across reads.

use super::{HttpError, DEFAULT_MAX_BODY_BYTES};

/// Longest chunk-size line (size, extensions, line end), in bytes.
pub const MAX_CHUNK_LINE_BYTES: usize = 4 * 1024;
/// Longest trailer section after the last chunk, in bytes.
pub const MAX_TRAILER_BYTES: usize = 8 * 1024;
/// Least framing (every byte that is not payload: size lines, extensions, line ends, trailers)
/// a message may carry; the budget is the larger of this and the payload limit.
pub const MIN_CHUNK_FRAMING_BYTES: u64 = 64 * 1024;

/// Result of feeding bytes to a [`ChunkedScanner`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkProgress {
    /// The message is not finished; all of the input was consumed. Feed more.
    NeedMore {
        /// Bytes of the input consumed (always the whole input).
        consumed: usize,
    },
    /// The message ended; bytes after `consumed` belong to the next message.
    Done {
        /// Bytes of the input that belonged to this message.
        consumed: usize,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Reading hex digits of a chunk size; `digits` counts them (at least one required).
    Size { digits: u32 },
    /// After the size: optional whitespace, then `;` extensions or the line end.
    AfterSize,
    /// Inside chunk extensions, skipping to the line end.
    Extension,
    /// Saw CR ending the size line; expect LF.
    SizeLf,
    /// Payload bytes of the current chunk still to come.
    Data,
    /// After a chunk's payload: expect CR LF or LF.
    DataEnd,
    /// Saw CR after the payload; expect LF.
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    /// Inside a trailer field line.
    TrailerLine,
    /// Saw CR inside a trailer field line; expect LF.
    TrailerLf,
    /// Saw CR on an empty line: expect the final LF.
    EndLf,
    /// The message is complete.
    Done,
}

/// Streaming scanner/decoder for a chunked body; see the module docs.
#[derive(Debug, Clone)]
pub struct ChunkedScanner {
    state: State,
    /// Current chunk size while parsing, then bytes of payload left in the chunk.
    remaining: u64,
    /// Decoded payload bytes so far.
    total: u64,
    max_body_bytes: u64,
    /// Bytes of the current size line, or of the trailer section.
    line_bytes: usize,
    /// Framing bytes left for this message (see the module docs).
    framing_left: u64,
}

impl Default for ChunkedScanner {
    /// A scanner bounded by [`DEFAULT_MAX_BODY_BYTES`].
    fn default() -> Self {
        ChunkedScanner::new(DEFAULT_MAX_BODY_BYTES)
    }
}

impl ChunkedScanner {
    /// A scanner for one message whose decoded payload may be at most `max_body_bytes`.
    pub fn new(max_body_bytes: u64) -> Self {
        ChunkedScanner {
            state: State::Size { digits: 0 },
            remaining: 0,
            total: 0,
            max_body_bytes,
            line_bytes: 0,
            framing_left: max_body_bytes.max(MIN_CHUNK_FRAMING_BYTES),
        }
    }

    /// Whether the final chunk and trailers have been seen.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decoded payload bytes seen so far.
    pub fn payload_len(&self) -> u64 {
        self.total
    }

    /// Scan raw chunked bytes without decoding (used when forwarding bytes unchanged).
    ///
    /// `consumed` counts bytes of `input` that belong to this message; on `Done`, bytes after
    /// `consumed` belong to the next message. Once done, further calls return `Done { consumed: 0 }`.
    ///
    /// # Errors
    /// [`HttpError::BodyTooLarge`] when the payload would exceed the maximum, or the framing its
    /// budget;
    /// [`HttpError::BadChunk`] for a bad size line, missing line end, or oversized size line or
    /// trailer section. After an error the scanner's state is unspecified; drop the connection.
    pub fn scan(&mut self, input: &[u8]) -> Result<ChunkProgress, HttpError> {
        self.run(input, None)
    }

    /// Same as [`scan`](Self::scan), but also appends decoded payload bytes to `out`.
    ///
    /// # Errors
    /// As for [`scan`](Self::scan).
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<ChunkProgress, HttpError> {
        self.run(input, Some(out))
    }

    fn run(
        &mut self,
        input: &[u8],
        mut out: Option<&mut Vec<u8>>,
    ) -> Result<ChunkProgress, HttpError> {
        let mut i = 0;
        while i < input.len() {
            if self.state == State::Data {
                // Bulk path: the payload is never inspected.
                let avail = input.len() - i;
                let take = usize::try_from(self.remaining).map_or(avail, |r| r.min(avail));
                if let Some(out) = out.as_deref_mut() {
                    out.extend_from_slice(&input[i..i + take]);
                }
                i += take;
                self.remaining -= take as u64;
                if self.remaining == 0 {
                    self.state = State::DataEnd;
                }
                continue;
            }
            if self.state == State::Done {
                return Ok(ChunkProgress::Done { consumed: i });
            }
            let b = input[i];
            i += 1;
            self.step(b)?;
        }
        if self.state == State::Done {
            Ok(ChunkProgress::Done { consumed: i })
        } else {
            Ok(ChunkProgress::NeedMore { consumed: i })
        }
    }

    /// Advance the state machine by one non-payload byte.
    fn step(&mut self, b: u8) -> Result<(), HttpError> {
        self.framing_left = self
            .framing_left
            .checked_sub(1)
            .ok_or(HttpError::BodyTooLarge)?;
        match self.state {
            State::Size { .. } | State::AfterSize | State::Extension | State::SizeLf => {
                self.line_bytes += 1;
                if self.line_bytes > MAX_CHUNK_LINE_BYTES {
                    return Err(HttpError::BadChunk);
                }
            }
            State::TrailerStart | State::TrailerLine | State::TrailerLf | State::EndLf => {
                self.line_bytes += 1;
                if self.line_bytes > MAX_TRAILER_BYTES {
                    return Err(HttpError::BadChunk);
                }
            }
            State::Data | State::DataEnd | State::DataLf | State::Done => {}
        }
        self.state = match self.state {
            State::Size { digits } => match hex_value(b) {
                Some(v) => {
                    if self.remaining > u64::MAX >> 4 {
                        return Err(HttpError::BadChunk);
                    }
                    self.remaining = (self.remaining << 4) | u64::from(v);
                    State::Size { digits: digits + 1 }
                }
                None if digits == 0 => return Err(HttpError::BadChunk),
                None => return self.after_size(b),
            },
            State::AfterSize => return self.after_size(b),
            State::Extension => match b {
                b'\r' => State::SizeLf,
                b'\n' => return self.size_line_done(),
                b'\t' => State::Extension,
                0..=0x1f | 0x7f => return Err(HttpError::BadChunk),
                _ => State::Extension,
            },
            State::SizeLf => match b {
                b'\n' => return self.size_line_done(),
                _ => return Err(HttpError::BadChunk),
            },
            State::DataEnd => match b {
                b'\r' => State::DataLf,
                b'\n' => self.next_size(),
                _ => return Err(HttpError::BadChunk),
            },
            State::DataLf => match b {
                b'\n' => self.next_size(),
                _ => return Err(HttpError::BadChunk),
            },
            State::TrailerStart => match b {
                b'\r' => State::EndLf,
                b'\n' => State::Done,
                // A trailer line may not start with whitespace (obs-fold) or a control byte.
                b' ' | b'\t' | 0..=0x1f | 0x7f => return Err(HttpError::BadChunk),
                _ => State::TrailerLine,
            },
            State::TrailerLine => match b {
                b'\r' => State::TrailerLf,
                b'\n' => State::TrailerStart,
                b'\t' => State::TrailerLine,
                0..=0x1f | 0x7f => return Err(HttpError::BadChunk),
                _ => State::TrailerLine,
            },
            State::TrailerLf | State::EndLf => match b {
                b'\n' if self.state == State::EndLf => State::Done,
                b'\n' => State::TrailerStart,
                _ => return Err(HttpError::BadChunk),
            },
            State::Data | State::Done => unreachable!("handled in run"),
        };
        Ok(())
    }

    /// A byte after the size digits: whitespace, `;` or the line end.
    fn after_size(&mut self, b: u8) -> Result<(), HttpError> {
        self.state = match b {
            b' ' | b'\t' => State::AfterSize,
            b';' => State::Extension,
            b'\r' => State::SizeLf,
            b'\n' => return self.size_line_done(),
            _ => return Err(HttpError::BadChunk),
        };
        Ok(())
    }

    /// The size line ended: check the body limit and move to payload or trailers.
    fn size_line_done(&mut self) -> Result<(), HttpError> {
        let size = self.remaining;
        self.total = self
            .total
            .checked_add(size)
            .filter(|&t| t <= self.max_body_bytes)
            .ok_or(HttpError::BodyTooLarge)?;
        self.line_bytes = 0;
        self.state = if size == 0 {
            State::TrailerStart
        } else {
            State::Data
        };
        Ok(())
    }

    fn next_size(&mut self) -> State {
        self.remaining = 0;
        self.line_bytes = 0;
        State::Size { digits: 0 }
    }
}

fn hex_value(b: u8) -> Option<u8> {
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

    fn decode_all(input: &[u8], max: u64) -> Result<(Vec<u8>, usize), HttpError> {
        let mut s = ChunkedScanner::new(max);
        let mut out = Vec::new();
        match s.decode(input, &mut out)? {
            ChunkProgress::Done { consumed } => Ok((out, consumed)),
            ChunkProgress::NeedMore { .. } => {
                panic!("incomplete: {:?}", String::from_utf8_lossy(input))
            }
        }
    }

    #[test]
    fn decodes() {
        let table: &[(&[u8], &[u8])] = &[
            (b"0\r\n\r\n", b""),
            (b"5\r\nhello\r\n0\r\n\r\n", b"hello"),
            (b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"hello world"),
            (b"A\r\n0123456789\r\n0\r\n\r\n", b"0123456789"),
            (b"a\r\n0123456789\r\n000\r\n\r\n", b"0123456789"),
            (b"0005\r\nhello\r\n0\r\n\r\n", b"hello"),
            // Extensions, with and without whitespace and values.
            (b"5;foo=bar\r\nhello\r\n0;last\r\n\r\n", b"hello"),
            (b"5 ; foo=\"a b;c\"\r\nhello\r\n0\r\n\r\n", b"hello"),
            // Trailers.
            (b"5\r\nhello\r\n0\r\nX-Trailer: 1\r\nY: 2\r\n\r\n", b"hello"),
            // Bare LF everywhere.
            (b"5\nhello\n0\nX: y\n\n", b"hello"),
            // Payload containing CRLF and hex digits.
            (b"4\r\n\r\n0\r\r\n0\r\n\r\n", b"\r\n0\r"),
        ];
        for (input, want) in table {
            let (out, consumed) = decode_all(input, 1 << 20).unwrap();
            assert_eq!(out, *want, "{}", String::from_utf8_lossy(input));
            assert_eq!(consumed, input.len());
        }
    }

    #[test]
    fn done_leaves_next_message() {
        let input = b"3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\n";
        let mut s = ChunkedScanner::new(100);
        assert_eq!(s.scan(input), Ok(ChunkProgress::Done { consumed: 13 }));
        assert!(s.is_done());
        assert_eq!(s.payload_len(), 3);
        assert_eq!(s.scan(b"more"), Ok(ChunkProgress::Done { consumed: 0 }));
    }

    #[test]
    fn errors() {
        let table: &[(&[u8], HttpError)] = &[
            (b"ffffffffffffffffff\r\n", HttpError::BadChunk),
            (b"10000000000000000\r\n", HttpError::BadChunk),
            (b"\r\n", HttpError::BadChunk),
            (b"x\r\n", HttpError::BadChunk),
            (b"-5\r\n", HttpError::BadChunk),
            (b"0x5\r\n", HttpError::BadChunk),
            (b"5 5\r\n", HttpError::BadChunk),
            (b"5\rhello", HttpError::BadChunk),
            (b"5\r\nhelloX", HttpError::BadChunk),
            (b"5\r\nhello\rX", HttpError::BadChunk),
            (b"5\r\nhello0\r\n\r\n", HttpError::BadChunk),
            (b"5;a\0b\r\n", HttpError::BadChunk),
            (b"0\r\nX: a\rb\r\n\r\n", HttpError::BadChunk),
            (b"0\r\nX: a\r\n b\r\n\r\n", HttpError::BadChunk),
            (b"0\r\n\rX", HttpError::BadChunk),
            (b"ffffffffffffffff\r\n", HttpError::BodyTooLarge),
            (b"10001\r\n", HttpError::BodyTooLarge),
            (b"8000\r\n", HttpError::BodyTooLarge),
        ];
        for (input, want) in table {
            let mut s = ChunkedScanner::new(0x8000 - 1);
            assert_eq!(
                s.scan(input),
                Err(*want),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }

    fn chunked_body(payload_len: usize, chunk: usize) -> (Vec<u8>, Vec<u8>) {
        let payload: Vec<u8> = (0..payload_len).map(|i| b'a' + (i % 26) as u8).collect();
        let mut body = Vec::new();
        for c in payload.chunks(chunk) {
            body.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
            body.extend_from_slice(c);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"0\r\n\r\n");
        (body, payload)
    }

    #[test]
    fn body_limit_boundary() {
        let max = crate::http::DEFAULT_MAX_BODY_BYTES as usize;
        let (body, payload) = chunked_body(max, 4096);
        let (out, _) = decode_all(&body, max as u64).unwrap();
        assert_eq!(out, payload);
        let (body, _) = chunked_body(max + 1, 4096);
        let mut s = ChunkedScanner::default();
        assert_eq!(s.scan(&body), Err(HttpError::BodyTooLarge));
        assert_eq!(HttpError::BodyTooLarge.status(), 413);
    }

    /// One-byte chunks with maximal extensions: the framing budget (here the 64 KiB minimum)
    /// stops them long before the payload limit would, wherever the reads split.
    #[test]
    fn framing_budget() {
        let ext = "e".repeat(MAX_CHUNK_LINE_BYTES - 8);
        let chunk = format!("1;{ext}\r\nx\r\n");
        let per_chunk = chunk.len() - 1; // framing bytes per chunk
        let fits = MIN_CHUNK_FRAMING_BYTES as usize / per_chunk;
        let ok = format!("{}0\r\n\r\n", chunk.repeat(fits - 1));
        let (out, _) = decode_all(ok.as_bytes(), 1 << 20).unwrap();
        assert_eq!(out.len(), fits - 1);
        let bomb = chunk.repeat(fits + 1);
        let mut s = ChunkedScanner::new(1 << 10);
        let mut res = Ok(ChunkProgress::NeedMore { consumed: 0 });
        for piece in bomb.as_bytes().chunks(777) {
            res = s.scan(piece);
            if res.is_err() {
                break;
            }
        }
        assert_eq!(res, Err(HttpError::BodyTooLarge));
        // A larger payload limit raises the budget with it (responses of a few MiB).
        assert!(ChunkedScanner::new(4 << 20).scan(bomb.as_bytes()).is_ok());
    }

    #[test]
    fn line_bounds() {
        let mut long_ext = b"5;".to_vec();
        long_ext.extend(std::iter::repeat_n(b'x', MAX_CHUNK_LINE_BYTES));
        assert_eq!(
            ChunkedScanner::new(100).scan(&long_ext),
            Err(HttpError::BadChunk)
        );

        let mut trailers = b"0\r\n".to_vec();
        while trailers.len() < 3 + MAX_TRAILER_BYTES {
            trailers.extend_from_slice(b"X-Trailer: 0123456789\r\n");
        }
        assert_eq!(
            ChunkedScanner::new(100).scan(&trailers),
            Err(HttpError::BadChunk)
        );

        let mut ok = b"0\r\n".to_vec();
        ok.extend_from_slice(b"X-Trailer: 0123456789\r\n\r\n");
        assert!(
            ChunkedScanner::new(100).scan(&ok).unwrap()
                == ChunkProgress::Done { consumed: ok.len() }
        );
    }

    #[test]
    fn every_split_point() {
        let (mut body, payload) = chunked_body(100, 7);
        // Add an extension and a trailer so every state sees a split.
        body.splice(0..0, b"3;ext=1\r\nxyz\r\n".iter().copied());
        let trailer_at = body.len() - 2;
        body.splice(trailer_at..trailer_at, b"X-T: v\r\n".iter().copied());
        let mut want = b"xyz".to_vec();
        want.extend_from_slice(&payload);
        let next = b"POST / HTTP/1.1\r\n";
        let mut stream = body.clone();
        stream.extend_from_slice(next);

        for split in 0..=stream.len() {
            let (a, b) = stream.split_at(split);
            let mut s = ChunkedScanner::new(1000);
            let mut out = Vec::new();
            let mut consumed = 0;
            let mut done = false;
            for piece in [a, b] {
                if done {
                    break;
                }
                match s.decode(piece, &mut out).unwrap() {
                    ChunkProgress::NeedMore { consumed: c } => {
                        assert_eq!(c, piece.len());
                        consumed += c;
                    }
                    ChunkProgress::Done { consumed: c } => {
                        consumed += c;
                        done = true;
                    }
                }
            }
            assert!(done, "split {split}");
            assert_eq!(consumed, body.len(), "split {split}");
            assert_eq!(out, want, "split {split}");
        }
    }

    #[test]
    fn byte_at_a_time() {
        let (body, payload) = chunked_body(50, 9);
        let mut s = ChunkedScanner::new(1000);
        let mut out = Vec::new();
        for (i, b) in body.iter().enumerate() {
            let p = s.decode(std::slice::from_ref(b), &mut out).unwrap();
            if i + 1 == body.len() {
                assert_eq!(p, ChunkProgress::Done { consumed: 1 });
            } else {
                assert_eq!(p, ChunkProgress::NeedMore { consumed: 1 });
            }
        }
        assert_eq!(out, payload);
    }
}
