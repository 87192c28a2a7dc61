//! Agent response framing as the proxy's upstream reader does it, checked for
//! content, not just for panics. The first byte picks the mode:
//!
//! - even: the rest builds an oracle response (`tests/common/oracle.rs`, the
//!   one the proptest differential uses) that knows where it ends, its
//!   payload and its keep-alive; the framer must find exactly that, at no
//!   prefix earlier, and the head written downstream must be the oracle's;
//! - odd: the rest is raw bytes; whatever the framer accepts must be
//!   consistent with the head it returned (the length it claims is the
//!   head plus the body that head describes, a chunked body decodes to that
//!   end), and the head written downstream, followed by the same body,
//!   must frame to the same status and body again.
#![no_main]

#[path = "../../tests/common/oracle.rs"]
mod oracle;

use libfuzzer_sys::fuzz_target;
use metaproxy::http::{self, ChunkProgress, ChunkedScanner, Limits, ResponseBody};

const MAX: u64 = 1 << 20;

fn frame(bytes: &[u8], is_head: bool, eof: bool) -> Option<(usize, http::ResponseHead)> {
    http::frame_response(bytes, &Limits::default(), is_head, MAX, eof)
        .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(bytes)))
}

fn modelled(data: &[u8], close: bool) {
    let m = oracle::Model::from_bytes(data);
    let w = m.wire();
    let end = w.end.unwrap_or(w.bytes.len());
    for eof in [false, true] {
        let got = frame(&w.bytes, m.is_head, eof).map(|(n, _)| n);
        let want = (w.end.is_some() || eof).then_some(end);
        assert_eq!(got, want, "eof={eof} {m:?}");
    }
    for k in 0..end {
        assert!(
            frame(&w.bytes[..k], m.is_head, false).is_none(),
            "prefix {k}: {m:?}"
        );
    }
    let (_, head) = frame(&w.bytes, m.is_head, true).unwrap();
    assert_eq!((head.status, head.head_len), (m.status, w.head_len));
    assert_eq!(head.keep_alive, w.keep_alive, "{m:?}");
    if head.body == ResponseBody::Chunked {
        let mut payload = Vec::new();
        let got = ChunkedScanner::new(MAX).decode(&w.bytes[w.head_len..], &mut payload);
        assert_eq!(
            got,
            Ok(ChunkProgress::Done {
                consumed: end - w.head_len
            })
        );
        assert_eq!(payload, w.payload);
    } else {
        assert_eq!(&w.bytes[w.head_len..end], &w.payload[..]);
    }
    let mut out = Vec::new();
    http::write_response_head(&w.bytes, &head, close, &mut out);
    assert_eq!(out, oracle::rewritten_head(&m, close), "{m:?}");
}

fn raw(rest: &[u8], is_head: bool, eof: bool, close: bool) {
    let Ok(Some((len, head))) = http::frame_response(rest, &Limits::default(), is_head, MAX, eof)
    else {
        return;
    };
    assert!(head.head_len <= len && len <= rest.len());
    let body = &rest[head.head_len..len];
    match head.body {
        ResponseBody::None => assert!(body.is_empty()),
        ResponseBody::Length(n) => assert_eq!(body.len() as u64, n),
        ResponseBody::UntilClose => assert!(eof && len == rest.len()),
        ResponseBody::Chunked => {
            let mut payload = Vec::new();
            let got = ChunkedScanner::new(MAX).decode(&rest[head.head_len..], &mut payload);
            assert_eq!(
                got,
                Ok(ChunkProgress::Done {
                    consumed: body.len()
                })
            );
        }
    }
    let mut out = Vec::new();
    http::write_response_head(rest, &head, close, &mut out);
    let head_len = out.len();
    out.extend_from_slice(body);
    // CRLF for LF and an added `Connection: close` may take the head past
    // the default limits; that is the client's concern, not a framing one.
    let roomy = Limits {
        max_head_bytes: 1 << 20,
        max_headers: 1024,
        ..Limits::default()
    };
    let (n, again) = http::frame_response(&out, &roomy, is_head, MAX, true)
        .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&out)))
        .expect("rewritten response frames");
    assert_eq!((n, again.head_len), (out.len(), head_len));
    assert_eq!((again.status, again.body), (head.status, head.body));
    assert_eq!(again.reason.get(&out), head.reason.get(rest));
    if close {
        assert!(!again.keep_alive);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let close = flags & 8 == 8;
    if flags & 1 == 0 {
        modelled(rest, close);
    } else {
        raw(rest, flags & 2 == 2, flags & 4 == 4, close);
    }
});
