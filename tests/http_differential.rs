//! proptest differentials of the code production runs against naive oracles:
//!
//! - the proxy's upstream rewrite, `proxy::conn::upstream_head` (what
//!   `proxy::conn` sends the agent), against a line-by-line model of which
//!   fields survive;
//! - response framing, `http::frame_response` plus the chunked decoder and
//!   `http::write_response_head`, against [`common::oracle`]'s hand-built
//!   responses, whole and at every prefix.
//!
//! The oracles carry their own copies of the header lists on purpose: a name
//! added to or dropped from a production list must be a visible decision here.
//! Case counts are small (the suite stays fast); on a failure proptest shrinks
//! the input and prints the minimal case. `PROPTEST_CASES=5000` runs more.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use common::oracle::{rewritten_head, Model};
use metaproxy::http::{self, ChunkProgress, ChunkedScanner, Limits, ResponseBody};
use metaproxy::proxy::config::NsIdentity;
use proptest::prelude::*;

/// Trust headers: deleted in any case and with `_` for `-`.
const ORACLE_TRUST: &[&str] = &[
    "x-forwarded-for",
    "forwarded",
    "x-real-ip",
    "x-neutron-router-id",
    "x-neutron-network-id",
    "x-ovn-network-id",
    "x-instance-id",
    "x-instance-id-signature",
    "x-tenant-id",
];
/// IMDSv2 token headers: deleted in any case and with `_` for `-`, like trust headers.
const ORACLE_TOKEN: &[&str] = &[
    "x-aws-ec2-metadata-token",
    "x-metadata-token",
    "x-aws-ec2-metadata-token-ttl-seconds",
    "x-metadata-token-ttl-seconds",
];
/// Hop-by-hop headers: deleted in any case (spelled with `-` only).
const ORACLE_DROPPED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "upgrade",
    "expect",
    "proxy-authorization",
];
/// Names that must pass, some of them one character away from a dropped one.
const ORACLE_KEPT: &[&str] = &[
    "accept",
    "user-agent",
    "content-type",
    "transfer-encoding-x",
    "x-forwarded-for-not",
    "x-forwarded",
    "te2",
    "x-metadata-token2",
    "x_forwarded__for",
    "x-ovn-network",
];
const VALUES: &[&str] = &[
    "",
    "v",
    "a, b",
    "1.2.3.4",
    "x y\tz",
    "~!#$%&'*+.^_`|",
    "spoofed",
];
const TARGETS: &[&str] = &[
    "/",
    "/latest/meta-data/",
    "/openstack/latest/meta_data.json?a=b",
    "/latest/api/token",
];

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        ..ProptestConfig::default()
    }
}

/// A header name from the pools, with each letter's case and each `-`
/// (as `_`) chosen by the generator.
fn header_name() -> impl Strategy<Value = String> {
    let pool: Vec<&'static str> = ORACLE_TRUST
        .iter()
        .chain(ORACLE_TOKEN)
        .chain(ORACLE_DROPPED)
        .chain(ORACLE_KEPT)
        .copied()
        .collect();
    (
        prop::sample::select(pool),
        prop::collection::vec(any::<(bool, bool)>(), 40),
    )
        .prop_map(|(name, flips)| {
            name.chars()
                .zip(flips)
                .map(|(c, (upper, underscore))| match c {
                    '-' if underscore => '_',
                    c if upper => c.to_ascii_uppercase(),
                    c => c,
                })
                .collect()
        })
}

fn peer() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(|o| IpAddr::V4(Ipv4Addr::from(o))),
        any::<[u16; 8]>().prop_map(|s| IpAddr::V6(Ipv6Addr::from(s))),
        any::<[u8; 4]>().prop_map(|o| IpAddr::V6(Ipv4Addr::from(o).to_ipv6_mapped())),
    ]
}

fn identity() -> impl Strategy<Value = NsIdentity> {
    (0..3u8, any::<u32>()).prop_map(|(kind, id)| {
        let id = format!("{id:08x}-0000-4000-8000-00000000c001");
        match kind {
            0 => NsIdentity::Router(id),
            1 => NsIdentity::Network(id),
            _ => NsIdentity::OvnNetwork(id),
        }
    })
}

/// The oracle's X-Forwarded-For: an IPv4-mapped IPv6 peer is its IPv4.
fn oracle_xff(ip: IpAddr) -> String {
    match ip {
        IpAddr::V6(v6) => match v6.segments() {
            [0, 0, 0, 0, 0, 0xffff, hi, lo] => {
                Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo)).to_string()
            }
            _ => v6.to_string(),
        },
        v4 => v4.to_string(),
    }
}

fn oracle_keeps(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    let folded = lower.replace('_', "-");
    !ORACLE_TRUST.contains(&folded.as_str())
        && !ORACLE_TOKEN.contains(&folded.as_str())
        && !ORACLE_DROPPED.contains(&lower.as_str())
}

fn oracle_id_header(id: &NsIdentity) -> (&'static str, String) {
    match id {
        NsIdentity::Router(v) => ("X-Neutron-Router-ID", v.clone()),
        NsIdentity::Network(v) => ("X-Neutron-Network-ID", v.clone()),
        NsIdentity::OvnNetwork(v) => ("X-OVN-Network-ID", v.clone()),
    }
}

proptest! {
    #![proptest_config(config())]

    /// `upstream_head` keeps every other field byte for byte and in order,
    /// drops every trust, hop-by-hop and token field in any spelling, and
    /// adds exactly one X-Forwarded-For and one namespace id.
    #[test]
    fn upstream_head_matches_naive_oracle(
        method in prop::sample::select(&["GET", "HEAD", "PUT", "POST"][..]),
        target in prop::sample::select(TARGETS),
        lf_only in any::<bool>(),
        mut fields in prop::collection::vec(
            (header_name(), prop::sample::select(VALUES).prop_map(str::to_string)),
            0..20,
        ),
        host_at in any::<prop::sample::Index>(),
        peer in peer(),
        id in identity(),
    ) {
        // Exactly one Host (a second one is refused), anywhere.
        let at = host_at.index(fields.len() + 1);
        fields.insert(at, ("Host".into(), "169.254.169.254".into()));
        let eol = if lf_only { "\n" } else { "\r\n" };
        let mut req = format!("{method} {target} HTTP/1.1{eol}");
        for (n, v) in &fields {
            req.push_str(&format!("{n}: {v}{eol}"));
        }
        req.push_str(eol);

        let mut want = format!("{method} {target} HTTP/1.1\r\n");
        for (n, v) in fields.iter().filter(|(n, _)| oracle_keeps(n)) {
            want.push_str(&format!("{n}: {v}\r\n"));
        }
        let (id_name, id_value) = oracle_id_header(&id);
        want.push_str(&format!("X-Forwarded-For: {}\r\n{id_name}: {id_value}\r\n\r\n", oracle_xff(peer)));

        let limits = Limits { max_headers: 128, ..Limits::default() };
        let head = http::parse_request(req.as_bytes(), &limits)
            .expect("generated request parses")
            .expect("generated request is complete");
        let mut out = b"kept|".to_vec();
        metaproxy::proxy::conn::upstream_head(req.as_bytes(), &head, peer, &id, &mut out);
        prop_assert_eq!(String::from_utf8(out).unwrap(), format!("kept|{want}"));
    }

    /// `frame_response` ends a response exactly where the oracle built it
    /// to end (never earlier at any prefix), the chunked decoder yields the
    /// payload whole and split, and `write_response_head` writes the
    /// oracle's downstream head, which frames the same way again.
    #[test]
    fn response_framing_matches_naive_oracle(
        data in prop::collection::vec(any::<u8>(), 0..160),
        split in any::<prop::sample::Index>(),
        close in any::<bool>(),
    ) {
        let m = Model::from_bytes(&data);
        check_framing(&m, split.index(usize::MAX), close)?;
    }
}

fn check_framing(m: &Model, split: usize, close: bool) -> Result<(), TestCaseError> {
    const MAX: u64 = 1 << 20;
    let w = m.wire();
    let limits = Limits::default();
    let frame = |bytes: &[u8], eof: bool| http::frame_response(bytes, &limits, m.is_head, MAX, eof);

    let end = w.end.unwrap_or(w.bytes.len());
    for eof in [false, true] {
        let got = frame(&w.bytes, eof).map_err(TestCaseError::fail)?;
        let want = if w.end.is_some() || eof {
            Some(end)
        } else {
            None
        };
        prop_assert_eq!(got.as_ref().map(|(n, _)| *n), want, "eof={} {:?}", eof, m);
    }
    for k in 0..end {
        let got = frame(&w.bytes[..k], false).map_err(TestCaseError::fail)?;
        prop_assert!(got.is_none(), "prefix {} of {} framed: {:?}", k, end, m);
    }

    let (_, head) = frame(&w.bytes, true).unwrap().unwrap();
    prop_assert_eq!(head.status, m.status);
    prop_assert_eq!(head.head_len, w.head_len);
    prop_assert_eq!(head.reason.get(&w.bytes), m.reason.as_bytes());
    prop_assert_eq!(head.keep_alive, w.keep_alive, "{:?}", m);
    let body = &w.bytes[w.head_len..end];
    match head.body {
        ResponseBody::None => prop_assert!(w.payload.is_empty() && body.is_empty()),
        ResponseBody::Length(n) => prop_assert_eq!(body, &w.payload[..], "length {}", n),
        ResponseBody::UntilClose => prop_assert_eq!(body, &w.payload[..]),
        ResponseBody::Chunked => {
            for at in [body.len(), split % (body.len() + 1)] {
                let mut dec = ChunkedScanner::new(MAX);
                let mut payload = Vec::new();
                let mut consumed = 0;
                for piece in [
                    &w.bytes[w.head_len..w.head_len + at],
                    &w.bytes[w.head_len + at..],
                ] {
                    match dec.decode(piece, &mut payload).unwrap() {
                        ChunkProgress::NeedMore { consumed: c } => consumed += c,
                        ChunkProgress::Done { consumed: c } => {
                            consumed += c;
                            break;
                        }
                    }
                }
                prop_assert!(dec.is_done());
                prop_assert_eq!(consumed, body.len(), "split at {}", at);
                prop_assert_eq!(&payload, &w.payload);
            }
        }
    }

    // What the proxy forwards downstream: the rewritten head, then the body.
    let mut out = Vec::new();
    http::write_response_head(&w.bytes, &head, close, &mut out);
    let want = rewritten_head(m, close);
    prop_assert_eq!(
        String::from_utf8_lossy(&out),
        String::from_utf8_lossy(&want)
    );
    let head_len = out.len();
    out.extend_from_slice(body);
    let (n, again) = frame(&out, true).unwrap().unwrap();
    prop_assert_eq!(n, out.len());
    prop_assert_eq!(again.head_len, head_len);
    prop_assert_eq!(again.status, head.status);
    prop_assert_eq!(again.body, head.body);
    Ok(())
}

/// A few hand-picked models, so the shapes the generator must reach are
/// pinned even if its byte mapping changes.
#[test]
fn framing_oracle_examples() {
    use common::oracle::Body;
    let base = Model {
        http10: false,
        status: 200,
        reason: "OK".into(),
        headers: vec![("Content-Type".into(), "application/json".into())],
        framing_at: 1,
        body: Body::Empty,
        lf_only: false,
        is_head: false,
        next: b"HTTP/1.1 200 OK\r\n".to_vec(),
    };
    let chunked = Body::Chunked {
        chunks: vec![b"{\"a\":".to_vec(), vec![b'x'; 17]],
        trailers: vec![("X-T".into(), "1".into())],
        ext: true,
        upper: true,
    };
    for (body, status, lf_only, is_head) in [
        (
            Body::Length(b"{\"uuid\": \"x\"}".to_vec()),
            200,
            false,
            false,
        ),
        (chunked.clone(), 200, false, false),
        (chunked, 200, true, false),
        (Body::Close(b"until close".to_vec()), 200, false, false),
        (Body::Close(Vec::new()), 204, false, false),
        (Body::Length(b"abc".to_vec()), 404, true, false),
        (Body::Length(b"ignored".to_vec()), 200, false, true),
        (Body::Empty, 304, false, false),
    ] {
        let m = Model {
            body,
            status,
            lf_only,
            is_head,
            ..base.clone()
        };
        for close in [false, true] {
            check_framing(&m, 3, close).unwrap();
        }
    }
}
