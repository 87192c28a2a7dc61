//! Agent response framing as the proxy's upstream reader does it: never a
//! panic, and a complete response never claims more bytes than it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use metaproxy::http::Limits;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (is_head, eof) = (flags & 1 == 1, flags & 2 == 2);
    if let Ok(Some((len, head))) =
        metaproxy::http::frame_response(rest, &Limits::default(), is_head, 1 << 20, eof)
    {
        assert!(len <= rest.len());
        assert!(head.head_len <= len);
        let mut out = Vec::new();
        metaproxy::http::write_response_head(rest, &head, flags & 4 == 4, &mut out);
        assert!(out.ends_with(b"\r\n\r\n"));
    }
});
