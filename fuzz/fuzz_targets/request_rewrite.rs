//! Request head parsing + the proxy's upstream rewrite. Invariant: whatever
//! the client sent, the head the agent receives parses, carries exactly one
//! X-Forwarded-For (the peer) and exactly one router id, and no other trust
//! or token header survives.
#![no_main]

use libfuzzer_sys::fuzz_target;
use metaproxy::proxy::config::NsIdentity;
use metaproxy::http::{self, Limits};

const ROUTER: &str = "6e1f3b0c-9d6a-4f0e-8b7a-2c1d0e9f8a7b";

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    let Ok(Some(head)) = http::parse_request(data, &limits) else {
        return;
    };
    let mut out = Vec::new();
    let id = NsIdentity::Router(ROUTER.into());
    metaproxy::proxy::conn::upstream_head(data, &head, "10.0.0.5".parse().unwrap(), &id, &mut out);
    let again = match http::parse_request(
        &out,
        &Limits {
            max_head_bytes: 1 << 20,
            max_headers: 1024,
            ..limits
        },
    ) {
        Ok(Some(h)) => h,
        other => panic!(
            "rewritten head does not parse: {other:?}\n{}",
            String::from_utf8_lossy(&out)
        ),
    };
    assert_eq!(again.head_len, out.len());
    let values = |name: &str| -> Vec<&[u8]> {
        again
            .headers
            .iter()
            .filter(|h| h.name.get(&out).eq_ignore_ascii_case(name.as_bytes()))
            .map(|h| h.value.get(&out))
            .collect()
    };
    assert_eq!(values("x-forwarded-for"), vec![&b"10.0.0.5"[..]]);
    assert_eq!(values("x-neutron-router-id"), vec![ROUTER.as_bytes()]);
    for h in http::TRUST_HEADERS
        .iter()
        .filter(|h| **h != "x-forwarded-for" && **h != "x-neutron-router-id")
    {
        assert!(values(h).is_empty(), "{h} survived");
    }
    for h in metaproxy::proxy::imdsv2::TOKEN_HEADERS
        .iter()
        .chain(metaproxy::proxy::imdsv2::TTL_HEADERS)
    {
        assert!(values(h).is_empty(), "{h} survived");
    }
    assert_eq!(again.method, head.method);
    assert_eq!(again.target.get(&out), head.target.get(data));
});
