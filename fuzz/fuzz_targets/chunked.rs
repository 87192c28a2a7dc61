//! Chunked decoding: fed whole or split at any point, the scanner and the
//! decoder agree on where the message ends and what the payload is.
#![no_main]

use libfuzzer_sys::fuzz_target;
use metaproxy::http::{ChunkProgress, ChunkedScanner};

fn run(pieces: &[&[u8]]) -> (Result<Option<usize>, ()>, Vec<u8>) {
    let mut sc = ChunkedScanner::new(1 << 20);
    let mut dec = ChunkedScanner::new(1 << 20);
    let mut out = Vec::new();
    let mut total = 0;
    for p in pieces {
        let a = sc.scan(p);
        let b = dec.decode(p, &mut out);
        match (a, b) {
            (Ok(ChunkProgress::Done { consumed: x }), Ok(ChunkProgress::Done { consumed: y })) => {
                assert_eq!(x, y);
                return (Ok(Some(total + x)), out);
            }
            (
                Ok(ChunkProgress::NeedMore { consumed: x }),
                Ok(ChunkProgress::NeedMore { consumed: y }),
            ) => {
                assert_eq!(x, y);
                assert!(x <= p.len());
                total += p.len();
            }
            (Err(_), Err(_)) => return (Err(()), out),
            (a, b) => panic!("scan {a:?} and decode {b:?} disagree"),
        }
    }
    (Ok(None), out)
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, body)) = data.split_first() else {
        return;
    };
    let at = usize::from(split) % (body.len() + 1);
    let (whole, out_whole) = run(&[body]);
    let (split_res, out_split) = run(&[&body[..at], &body[at..]]);
    if let (Ok(Some(a)), Ok(Some(b))) = (whole, split_res) {
        assert_eq!(a, b);
        assert_eq!(out_whole, out_split);
    }
});
