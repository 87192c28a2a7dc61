//! The IMDSv2 token validator: bytes never issued by an authority never
//! validate there; a real token validates only for its own client and
//! namespace, and any single flipped byte breaks it. Never a panic.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use metaproxy::proxy::imdsv2::TokenAuthority;

/// Validates arbitrary input and never issues: libFuzzer's comparison tracing
/// cannot learn a real token from it. (The first version of this target
/// checked arbitrary input against an authority that also issued tokens, and
/// libFuzzer replayed one of them, correctly accepted: a target bug, not a
/// validator bug.)
static NEVER_ISSUES: OnceLock<TokenAuthority> = OnceLock::new();
static ISSUER: OnceLock<TokenAuthority> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let v = NEVER_ISSUES.get_or_init(|| TokenAuthority::new().unwrap());
    assert!(!v.validate("ns", "10.0.0.5".parse().unwrap(), data, now));

    let a = ISSUER.get_or_init(|| TokenAuthority::new().unwrap());
    let tok = a.issue(
        "ns",
        "10.0.0.5".parse().unwrap(),
        Duration::from_secs(60),
        now,
    );
    assert!(a.validate("ns", "10.0.0.5".parse().unwrap(), tok.as_bytes(), now));
    if let Some((&i, rest)) = data.split_first() {
        let mut t = tok.clone().into_bytes();
        let i = usize::from(i) % t.len();
        let x = rest.first().copied().unwrap_or(1).max(1);
        t[i] ^= x;
        if t != tok.as_bytes() {
            assert!(
                !a.validate("ns", "10.0.0.5".parse().unwrap(), &t, now),
                "altered token validated"
            );
        }
    }
    assert!(!a.validate("ns", "10.0.0.6".parse().unwrap(), tok.as_bytes(), now));
    assert!(!a.validate("other", "10.0.0.5".parse().unwrap(), tok.as_bytes(), now));
});
