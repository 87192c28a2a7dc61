//! Naive oracles for response framing, shared by the proptest differential
//! (`tests/http_differential.rs`) and the `response_framing` fuzz target
//! (which includes this file by path, so it uses std only).
//!
//! A [`Model`] is a response described by its parts; [`Model::wire`]
//! serialises it by hand and knows, by construction, where the message ends,
//! what its decoded payload is and whether the connection may be reused.
//! [`rewritten_head`] is what the proxy must send downstream for it. The
//! production framer (`http::frame_response`, the chunked decoder and
//! `http::write_response_head`) is checked against these answers rather than
//! against itself. [`Model::from_bytes`] turns arbitrary bytes into a model,
//! so one generator serves both proptest (which shrinks the bytes) and
//! libFuzzer.
#![allow(dead_code)]

/// How the model's body is delimited on the wire.
#[derive(Clone, Debug)]
pub enum Body {
    /// `Content-Length: 0`.
    Empty,
    /// `Content-Length: n` and n bytes.
    Length(Vec<u8>),
    /// `Transfer-Encoding: chunked`: these non-empty chunks, then the last
    /// chunk, these trailer fields and the final empty line.
    Chunked {
        chunks: Vec<Vec<u8>>,
        trailers: Vec<(String, String)>,
        /// Add a `;ext=v` chunk extension to every size line.
        ext: bool,
        /// Write sizes in upper-case hex with a leading zero.
        upper: bool,
    },
    /// No framing header: the body runs until the upstream closes.
    Close(Vec<u8>),
}

/// A response as its parts.
#[derive(Clone, Debug)]
pub struct Model {
    pub http10: bool,
    pub status: u16,
    pub reason: String,
    /// Fields other than the framing one (Content-Length / Transfer-Encoding).
    pub headers: Vec<(String, String)>,
    /// Where among `headers` the framing field goes (modulo `headers.len() + 1`).
    pub framing_at: usize,
    pub body: Body,
    /// LF-only line ends (Neutron's error pages) instead of CRLF.
    pub lf_only: bool,
    /// The request was HEAD.
    pub is_head: bool,
    /// Bytes of the next pipelined response, appended unless the body is
    /// close-delimited.
    pub next: Vec<u8>,
}

/// A serialised [`Model`] and the facts the framer must find in it.
#[derive(Clone, Debug)]
pub struct Wire {
    pub bytes: Vec<u8>,
    pub head_len: usize,
    /// Where the message ends; `None` when it is close-delimited (it ends
    /// at `bytes.len()` once the peer has closed, and never before).
    pub end: Option<usize>,
    /// The decoded payload (empty when bodiless).
    pub payload: Vec<u8>,
    pub keep_alive: bool,
}

/// Header fields a model may carry besides its framing field.
pub const FIELDS: &[(&str, &str)] = &[
    ("Content-Type", "application/json"),
    ("content-type", "text/plain; charset=UTF-8"),
    ("Date", "Mon, 01 Jan 2024 00:00:00 GMT"),
    ("X-Openstack-Request-Id", "req-1"),
    ("Connection", "close"),
    ("Connection", "keep-alive"),
    ("connection", "Keep-Alive, Upgrade"),
    ("Connection", "te, CLOSE"),
    ("Keep-Alive", "timeout=5"),
    ("Proxy-Connection", "keep-alive"),
    ("Server", "a, b"),
    ("Vary", ""),
];
pub const REASONS: &[&str] = &["OK", "", "Not Found", "Not  Found ", "Weird Reason"];
pub const STATUSES: &[u16] = &[100, 101, 200, 201, 204, 300, 304, 404, 500, 503];

/// The response fields the proxy drops when it writes a head downstream.
pub const CONNECTION_FIELDS: &[&str] = &["connection", "keep-alive", "proxy-connection"];

/// A cursor over fuzz or proptest bytes; reads past the end as zeros.
struct Reader<'a>(&'a [u8]);
impl Reader<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn below(&mut self, n: usize) -> usize {
        usize::from(self.byte()) % n
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.byte()).collect()
    }
}

impl Model {
    /// A model from arbitrary bytes (every input gives a valid model).
    pub fn from_bytes(data: &[u8]) -> Model {
        let mut r = Reader(data);
        let flags = r.byte();
        let status = if flags & 0x80 != 0 {
            200 + r.below(400) as u16
        } else {
            STATUSES[r.below(STATUSES.len())]
        };
        let reason = REASONS[r.below(REASONS.len())].to_string();
        let headers = (0..r.below(6))
            .map(|_| {
                let (n, v) = FIELDS[r.below(FIELDS.len())];
                (n.to_string(), v.to_string())
            })
            .collect();
        let framing_at = usize::from(r.byte());
        let body = match r.below(4) {
            0 => Body::Empty,
            1 => Body::Length(r.bytes(40)),
            2 => Body::Chunked {
                chunks: (0..r.below(5))
                    .map(|_| {
                        let mut c = r.bytes(30);
                        if c.is_empty() {
                            c.push(b'x');
                        }
                        c
                    })
                    .collect(),
                trailers: (0..r.below(3))
                    .map(|i| (format!("X-Trailer-{i}"), "t".to_string()))
                    .collect(),
                ext: flags & 0x08 != 0,
                upper: flags & 0x10 != 0,
            },
            _ => Body::Close(r.bytes(40)),
        };
        let next = if flags & 0x20 != 0 {
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec()
        } else {
            r.bytes(8)
        };
        Model {
            http10: flags & 1 != 0,
            status,
            reason,
            headers,
            framing_at,
            body,
            lf_only: flags & 2 != 0,
            is_head: flags & 4 != 0,
            next,
        }
    }

    /// HEAD, 1xx, 204 and 304 have no body whatever the fields say.
    pub fn bodiless(&self) -> bool {
        self.is_head || self.status < 200 || self.status == 204 || self.status == 304
    }

    fn close_delimited(&self) -> bool {
        !self.bodiless() && matches!(self.body, Body::Close(_))
    }

    /// Every header field in wire order, the framing field included.
    pub fn fields(&self) -> Vec<(String, String)> {
        let mut f = self.headers.clone();
        let framing = match &self.body {
            Body::Empty => Some(("Content-Length", "0".to_string())),
            Body::Length(b) => Some(("Content-Length", b.len().to_string())),
            Body::Chunked { upper, .. } => Some((
                "Transfer-Encoding",
                if *upper { "Chunked" } else { "chunked" }.to_string(),
            )),
            Body::Close(_) => None,
        };
        if let Some((n, v)) = framing {
            f.insert(self.framing_at % (f.len() + 1), (n.to_string(), v));
        }
        f
    }

    /// Serialise the model.
    pub fn wire(&self) -> Wire {
        let eol: &[u8] = if self.lf_only { b"\n" } else { b"\r\n" };
        let mut bytes = Vec::new();
        let version = if self.http10 { "1.0" } else { "1.1" };
        bytes.extend_from_slice(
            format!("HTTP/{version} {} {}", self.status, self.reason).as_bytes(),
        );
        bytes.extend_from_slice(eol);
        for (n, v) in self.fields() {
            bytes.extend_from_slice(format!("{n}: {v}").as_bytes());
            bytes.extend_from_slice(eol);
        }
        bytes.extend_from_slice(eol);
        let head_len = bytes.len();

        let mut payload = Vec::new();
        if !self.bodiless() {
            match &self.body {
                Body::Empty => {}
                Body::Length(b) | Body::Close(b) => {
                    bytes.extend_from_slice(b);
                    payload.extend_from_slice(b);
                }
                Body::Chunked {
                    chunks,
                    trailers,
                    ext,
                    upper,
                } => {
                    let ext = if *ext { ";ext=v" } else { "" };
                    for c in chunks {
                        let size = if *upper {
                            format!("0{:X}", c.len())
                        } else {
                            format!("{:x}", c.len())
                        };
                        bytes.extend_from_slice(format!("{size}{ext}").as_bytes());
                        bytes.extend_from_slice(eol);
                        bytes.extend_from_slice(c);
                        bytes.extend_from_slice(eol);
                        payload.extend_from_slice(c);
                    }
                    bytes.extend_from_slice(format!("0{ext}").as_bytes());
                    bytes.extend_from_slice(eol);
                    for (n, v) in trailers {
                        bytes.extend_from_slice(format!("{n}: {v}").as_bytes());
                        bytes.extend_from_slice(eol);
                    }
                    bytes.extend_from_slice(eol);
                }
            }
        }
        let end = (!self.close_delimited()).then_some(bytes.len());
        if end.is_some() {
            bytes.extend_from_slice(&self.next);
        }

        let tokens = |want: &str| {
            self.headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
                .flat_map(|(_, v)| v.split(','))
                .any(|t| t.trim().eq_ignore_ascii_case(want))
        };
        let keep_alive =
            !self.close_delimited() && !tokens("close") && (!self.http10 || tokens("keep-alive"));
        Wire {
            bytes,
            head_len,
            end,
            payload,
            keep_alive,
        }
    }
}

/// The head the proxy must write downstream for `m`: an HTTP/1.1 status line
/// with the same code and reason, every field but the connection ones in
/// order with CRLF ends, and `Connection: close` when `close`.
pub fn rewritten_head(m: &Model, close: bool) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {:03} {}\r\n", m.status, m.reason);
    for (n, v) in m.fields() {
        if !CONNECTION_FIELDS.iter().any(|c| n.eq_ignore_ascii_case(c)) {
            out.push_str(&format!("{n}: {v}\r\n"));
        }
    }
    if close {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}
