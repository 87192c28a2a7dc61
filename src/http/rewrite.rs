//! Header rewrite between the guest and upstream: which request headers the proxy drops and which
//! it stamps.
//!
//! A guest controls every byte it sends, so any header upstream would treat as a statement by the
//! proxy ([`TRUST_HEADERS`]) is deleted in every occurrence and spelling, then set exactly once by
//! the proxy; the guest's IMDSv2 session headers ([`TOKEN_HEADERS`], [`TTL_HEADERS`]) are a
//! credential between guest and proxy and are deleted too. haproxy's config did this piecemeal
//! (and, with `option forwardfor`, kept a spoofed X-Forwarded-For, see spec §1.4); doing it in one
//! allow-by-predicate writer, [`rewrite_proxy_request`], makes "exactly one" checkable. It is what
//! production runs (`proxy::conn::upstream_head` only supplies the namespace's id), so its unit
//! tests, the differential against a naive oracle and `benches/http.rs` measure the real rewrite.
//! Which namespace a request came from, and whether its token is valid, are decided elsewhere
//! (`proxy::conn`, `proxy::imdsv2`). The writers copy the original name and value bytes, so
//! everything else passes through untouched, and append to a caller-owned `Vec` so the hot path
//! reuses one buffer.
//!
//! Rejected: honouring header names listed in the client's `Connection` field as extra hop-by-hop
//! headers. RFC 9110 asks for it, but it lets a guest delete framing headers (`Connection:
//! content-length`) between the proxy and upstream; the fixed [`HOP_BY_HOP`] list is enough for a
//! proxy that speaks its own keep-alive upstream.

use std::io::Write as _;
use std::net::IpAddr;

use super::{RequestHead, ResponseHead};

/// Client-supplied trust headers the proxy must delete (every occurrence, case-insensitive).
pub const TRUST_HEADERS: &[&str] = &[
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

/// Hop-by-hop headers never forwarded upstream on a pooled connection.
///
/// `transfer-encoding` is deliberately absent: the body is forwarded as-is, still chunked.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "upgrade",
    "expect",
    "proxy-authorization",
];

/// IMDSv2 token request header (AWS); Firecracker's alias is accepted too.
pub const TTL_HEADERS: &[&str] = &[
    "x-aws-ec2-metadata-token-ttl-seconds",
    "x-metadata-token-ttl-seconds",
];
/// IMDSv2 token header (AWS); Firecracker's alias is accepted too.
pub const TOKEN_HEADERS: &[&str] = &["x-aws-ec2-metadata-token", "x-metadata-token"];

/// Response headers that describe the upstream connection, not the response.
const RESPONSE_CONNECTION_HEADERS: &[&str] = &["connection", "keep-alive", "proxy-connection"];

fn in_list(list: &[&str], name: &[u8]) -> bool {
    list.iter().any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
}

/// Whether `name` is one of [`TRUST_HEADERS`] (ASCII case-insensitive), also when spelled with
/// `_` for `-` (`X_Forwarded_For`).
///
/// WSGI servers (PEP 3333) file `X-Neutron-Network-ID` and `X_Neutron_Network_ID` under the same
/// `HTTP_X_NEUTRON_NETWORK_ID`, so behind neutron-metadata-agent or Nova an underscore spelling
/// is the trust header; passed through, it would let a guest set an id the proxy never stamps.
/// nginx and gunicorn drop such names for the same reason.
pub fn is_trust_header(name: &[u8]) -> bool {
    TRUST_HEADERS.iter().any(|h| eq_wsgi(name, h))
}

/// ASCII case-insensitive equality of a header name with `known` (spelled with `-`), where `_`
/// in `name` also matches `-`: the two names a WSGI server files under one `HTTP_*` key.
fn eq_wsgi(name: &[u8], known: &str) -> bool {
    name.len() == known.len()
        && name.iter().zip(known.bytes()).all(|(&a, b)| {
            let a = if a == b'_' { b'-' } else { a };
            a.eq_ignore_ascii_case(&b)
        })
}

/// Whether `name` is one of the IMDSv2 token headers (request or TTL, ASCII case-insensitive,
/// also with `_` for `-` as for [`is_trust_header`]), which are never forwarded: behind a WSGI
/// server `X_aws_ec2_metadata_token` is the token header.
pub fn is_token_header(name: &[u8]) -> bool {
    TOKEN_HEADERS
        .iter()
        .chain(TTL_HEADERS)
        .any(|h| eq_wsgi(name, h))
}

/// Whether `name` is one of [`HOP_BY_HOP`] (ASCII case-insensitive).
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    in_list(HOP_BY_HOP, name)
}

/// Write `METHOD target HTTP/1.1\r\n`, then every header of `head` for which `keep(name)` is true,
/// as `name: value\r\n` (original name bytes and value bytes), then each `extra` pair, then
/// `\r\n`. Appends to `out`.
///
/// `buf` must be the buffer `head` was parsed from.
pub fn write_request_head(
    buf: &[u8],
    head: &RequestHead,
    keep: impl Fn(&[u8]) -> bool,
    extra: &[(&[u8], &[u8])],
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.target.get(buf));
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for h in &head.headers {
        let name = h.name.get(buf);
        if keep(name) {
            put_header(out, name, h.value.get(buf));
        }
    }
    for (name, value) in extra {
        put_header(out, name, value);
    }
    out.extend_from_slice(b"\r\n");
}

/// The proxy's rewrite of a guest's request head for the agent: drops every [`TRUST_HEADERS`],
/// [`HOP_BY_HOP`] and IMDSv2 token header, then adds exactly one `X-Forwarded-For: <peer>` and
/// one `<id_name>: <id_value>`. Appends to `out`. This is the security boundary the fuzz target
/// `request_rewrite` checks.
///
/// `id_name` is normally `X-Neutron-Router-ID`, `X-Neutron-Network-ID` or `X-OVN-Network-ID`; it
/// must itself be a trust header so a client copy of it is dropped. Returns how many trust
/// headers the client sent (the proxy counts a request with any as `rx_spoofed_header`).
pub fn rewrite_proxy_request(
    buf: &[u8],
    head: &RequestHead,
    peer: IpAddr,
    id_name: &[u8],
    id_value: &[u8],
    out: &mut Vec<u8>,
) -> usize {
    debug_assert!(
        is_trust_header(id_name),
        "id header {id_name:?} would not be de-duplicated"
    );
    let xff = format_ip_for_xff(peer);
    let spoofed = std::cell::Cell::new(0);
    write_request_head(
        buf,
        head,
        |name| {
            if is_trust_header(name) {
                spoofed.set(spoofed.get() + 1);
                return false;
            }
            !is_hop_by_hop(name) && !is_token_header(name)
        },
        &[(b"X-Forwarded-For", xff.as_bytes()), (id_name, id_value)],
        out,
    );
    spoofed.get()
}

/// Response head forwarded to the client: status line and headers unchanged except
/// Connection/Keep-Alive/Proxy-Connection are dropped, and `Connection: close\r\n` is appended
/// when `close` is true. Appends to `out`.
///
/// The status line is always written as `HTTP/1.1 <status> <reason>\r\n` with the upstream's
/// reason phrase bytes, whatever version or line ending upstream used.
pub fn write_response_head(buf: &[u8], head: &ResponseHead, close: bool, out: &mut Vec<u8>) {
    out.extend_from_slice(b"HTTP/1.1 ");
    let s = head.status;
    out.extend_from_slice(&[
        b'0' + (s / 100 % 10) as u8,
        b'0' + (s / 10 % 10) as u8,
        b'0' + (s % 10) as u8,
        b' ',
    ]);
    out.extend_from_slice(head.reason.get(buf));
    out.extend_from_slice(b"\r\n");
    for h in &head.headers {
        let name = h.name.get(buf);
        if !in_list(RESPONSE_CONNECTION_HEADERS, name) {
            put_header(out, name, h.value.get(buf));
        }
    }
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.reserve(name.len() + value.len() + 4);
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// An address as text, on the stack: [`format_ip_for_xff`]'s result.
pub struct IpText {
    buf: [u8; IP_TEXT_MAX],
    len: usize,
}

/// The longest address text: a full IPv6 address with an embedded IPv4
/// (`ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255`, 45 bytes).
const IP_TEXT_MAX: usize = 45;

impl IpText {
    /// The text.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// `ip` as an X-Forwarded-For value; IPv4-mapped IPv6 (`::ffff:a.b.c.d`, what a dual-stack
/// listener reports for a v4 guest) is printed as plain IPv4 so upstream sees the guest's address.
///
/// Every request the proxy relays carries one, so an IPv4 address is written digit by digit
/// into a stack buffer: `write!` through `Display` cost about 600 instructions and a heap
/// buffer per request (callgrind). IPv6 goes through `Display`, into the same buffer.
pub fn format_ip_for_xff(ip: IpAddr) -> IpText {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let mut t = IpText {
        buf: [0; IP_TEXT_MAX],
        len: 0,
    };
    match ip {
        IpAddr::V4(v4) => {
            let mut n = 0;
            for (i, o) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    t.buf[n] = b'.';
                    n += 1;
                }
                if o >= 100 {
                    t.buf[n] = b'0' + o / 100;
                    n += 1;
                }
                if o >= 10 {
                    t.buf[n] = b'0' + o / 10 % 10;
                    n += 1;
                }
                t.buf[n] = b'0' + o % 10;
                n += 1;
            }
            t.len = n;
        }
        IpAddr::V6(v6) => {
            let mut rest: &mut [u8] = &mut t.buf;
            // 45 bytes hold every IPv6 text, so the write cannot run short.
            let _ = write!(rest, "{v6}");
            t.len = IP_TEXT_MAX - rest.len();
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{parse_request, parse_response, HttpError, Limits};

    const CLOUD_INIT_GET: &[u8] = b"GET /openstack/2018-08-27/meta_data.json HTTP/1.1\r\nHost: 169.254.169.254\r\nUser-Agent: Cloud-Init/22.4.2\r\nAccept: */*\r\nAccept-Encoding: gzip, deflate\r\nConnection: keep-alive\r\n\r\n";

    /// Room for the 81 spoofed headers of `strips_every_spoofed_trust_header`.
    const MANY_HEADERS: Limits = Limits {
        max_head_bytes: crate::http::DEFAULT_MAX_HEAD_BYTES,
        max_headers: 128,
        max_body_bytes: crate::http::DEFAULT_MAX_BODY_BYTES,
    };

    fn parse(buf: &[u8]) -> RequestHead {
        parse_request(buf, &MANY_HEADERS).unwrap().unwrap()
    }

    fn mixed_case(s: &str) -> String {
        s.chars()
            .enumerate()
            .map(|(i, c)| {
                if i % 2 == 0 {
                    c.to_ascii_uppercase()
                } else {
                    c
                }
            })
            .collect()
    }

    fn proxy(buf: &[u8]) -> Vec<u8> {
        let head = parse(buf);
        let mut out = Vec::new();
        rewrite_proxy_request(
            buf,
            &head,
            "10.0.0.5".parse().unwrap(),
            b"X-Neutron-Router-ID",
            b"r-1",
            &mut out,
        );
        out
    }

    #[test]
    fn the_rewrite_counts_the_trust_headers_it_deletes() {
        let count = |req: &[u8]| {
            let head = parse(req);
            let mut out = Vec::new();
            let peer = "10.0.0.5".parse().unwrap();
            rewrite_proxy_request(req, &head, peer, b"X-Neutron-Router-ID", b"r", &mut out)
        };
        assert_eq!(
            count(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
            0
        );
        assert_eq!(
            count(
                b"GET / HTTP/1.1\r\nX-Forwarded-For: 1.2.3.4\r\nx_instance_id: i\r\n\
                  X-Neutron-Router-ID: other\r\nX-aws-ec2-metadata-token: t\r\n\r\n"
            ),
            3
        );
    }

    /// Re-parse rewritten output and check trust headers are exactly the injected ones.
    fn check_rewritten(out: &[u8]) -> RequestHead {
        let h = parse_request(out, &Limits::default()).unwrap().unwrap();
        assert_eq!(h.head_len, out.len());
        for t in TRUST_HEADERS {
            let want = match *t {
                "x-forwarded-for" | "x-neutron-router-id" => 1,
                _ => 0,
            };
            assert_eq!(
                h.header_count(out, t),
                want,
                "{t} in {}",
                String::from_utf8_lossy(out)
            );
        }
        for hop in HOP_BY_HOP.iter().chain(TOKEN_HEADERS).chain(TTL_HEADERS) {
            assert_eq!(h.header_count(out, hop), 0, "{hop}");
        }
        assert_eq!(h.header(out, "x-forwarded-for"), Some(&b"10.0.0.5"[..]));
        assert_eq!(h.header(out, "x-neutron-router-id"), Some(&b"r-1"[..]));
        h
    }

    #[test]
    fn cloud_init_request() {
        let out = proxy(CLOUD_INIT_GET);
        assert_eq!(
            out,
            b"GET /openstack/2018-08-27/meta_data.json HTTP/1.1\r\nHost: 169.254.169.254\r\nUser-Agent: Cloud-Init/22.4.2\r\nAccept: */*\r\nAccept-Encoding: gzip, deflate\r\nX-Forwarded-For: 10.0.0.5\r\nX-Neutron-Router-ID: r-1\r\n\r\n"
        );
        check_rewritten(&out);
    }

    #[test]
    fn strips_every_spoofed_trust_header() {
        for eol in ["\r\n", "\n"] {
            let mut req = format!("GET /latest/meta-data/ HTTP/1.1{eol}Host: 169.254.169.254{eol}");
            for t in TRUST_HEADERS {
                for spelling in [t.to_string(), t.to_ascii_uppercase(), mixed_case(t)] {
                    for value in ["spoofed", "", "1.2.3.4, 5.6.7.8"] {
                        req.push_str(&format!("{spelling}: {value}{eol}"));
                    }
                }
            }
            for hop in HOP_BY_HOP {
                req.push_str(&format!("{}: x{eol}", mixed_case(hop)));
            }
            req.push_str(&format!("Accept: */*{eol}{eol}"));
            let out = proxy(req.as_bytes());
            let h = check_rewritten(&out);
            assert_eq!(h.header(&out, "host"), Some(&b"169.254.169.254"[..]));
            assert_eq!(h.header(&out, "accept"), Some(&b"*/*"[..]));
            let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
            assert!(!text.contains("spoofed"), "{text}");
            assert!(!text.contains("1.2.3.4"), "{text}");
        }
    }

    #[test]
    fn obs_folded_trust_header_is_refused() {
        for req in [
            &b"GET / HTTP/1.1\r\nX-Forwarded-For: 1.2.3.4\r\n 5.6.7.8\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nAccept: */*\r\n\tX-Instance-ID: i-1\r\n\r\n",
            b"GET / HTTP/1.1\r\nAccept: */*\r\n X-Neutron-Router-ID: r\r\n\r\n",
            b"GET / HTTP/1.1\r\n X-Neutron-Router-ID: r\r\n\r\n",
        ] {
            let e = parse_request(req, &Limits::default()).unwrap_err();
            assert_eq!(e, HttpError::Malformed);
            assert_eq!(e.status(), 400);
        }
    }

    #[test]
    fn write_request_head_keep_and_extra() {
        let req = b"POST /p?x=1 HTTP/1.0\r\nA: 1\r\nb: 2\r\nContent-Length: 2\r\n\r\nhi";
        let head = parse(req);
        let mut out = b"prefix|".to_vec();
        write_request_head(
            req,
            &head,
            |n| !n.eq_ignore_ascii_case(b"a"),
            &[(b"C", b"3")],
            &mut out,
        );
        assert_eq!(
            out,
            b"prefix|POST /p?x=1 HTTP/1.1\r\nb: 2\r\nContent-Length: 2\r\nC: 3\r\n\r\n"
        );
    }

    #[test]
    fn chunked_request_keeps_framing() {
        let req = b"PUT /latest/api/token HTTP/1.1\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\nConnection: keep-alive\r\n\r\n";
        let out = proxy(req);
        let h = check_rewritten(&out);
        assert_eq!(h.header(&out, "transfer-encoding"), Some(&b"chunked"[..]));
        assert!(!h.expect_continue);
    }

    #[test]
    fn response_head_rewrite() {
        let res = b"HTTP/1.0 404 Not Found\nContent-Type: text/plain; charset=UTF-8\nConnection: keep-alive\nKeep-Alive: timeout=5\nContent-Length: 3\n\nabc";
        let head = parse_response(res, &Limits::default(), false)
            .unwrap()
            .unwrap();
        let mut out = Vec::new();
        write_response_head(res, &head, true, &mut out);
        assert_eq!(
            out,
            b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=UTF-8\r\nContent-Length: 3\r\nConnection: close\r\n\r\n"
        );
        let mut out = Vec::new();
        write_response_head(res, &head, false, &mut out);
        assert_eq!(
            out,
            b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=UTF-8\r\nContent-Length: 3\r\n\r\n"
        );
        let again = parse_response(&out, &Limits::default(), false)
            .unwrap()
            .unwrap();
        assert_eq!(again.status, 404);
        assert_eq!(again.head_len, out.len());

        let res = b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n";
        let head = parse_response(res, &Limits::default(), false)
            .unwrap()
            .unwrap();
        let mut out = Vec::new();
        write_response_head(res, &head, false, &mut out);
        assert_eq!(out, b"HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n");
    }

    #[test]
    fn xff_formatting() {
        let cases = [
            ("10.0.0.5", "10.0.0.5"),
            ("::ffff:10.0.0.5", "10.0.0.5"),
            ("fe80::1", "fe80::1"),
            ("2001:db8::5", "2001:db8::5"),
            ("::1", "::1"),
        ];
        for (ip, want) in cases {
            assert_eq!(
                format_ip_for_xff(ip.parse().unwrap()).as_bytes(),
                want.as_bytes()
            );
        }
    }

    /// The digit-by-digit IPv4 writer says what `Display` says, for every
    /// octet value in every position, and for the longest IPv6 texts.
    #[test]
    fn xff_text_is_display_for_every_octet_and_the_longest_v6() {
        for o in 0..=255u8 {
            for ip in [
                std::net::Ipv4Addr::new(o, 0, 0, 0),
                std::net::Ipv4Addr::new(9, o, 10, 99),
                std::net::Ipv4Addr::new(100, 255, o, 1),
                std::net::Ipv4Addr::new(255, 255, 255, o),
            ] {
                let text = format_ip_for_xff(IpAddr::V4(ip));
                assert_eq!(text.as_bytes(), ip.to_string().as_bytes());
                let mapped = format_ip_for_xff(IpAddr::V6(ip.to_ipv6_mapped()));
                assert_eq!(mapped.as_bytes(), ip.to_string().as_bytes());
            }
        }
        for v6 in [
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:ffff:ffff:ffff:ffff:ffff",
            "1111:2222:3333:4444:5555:6666:7777:8888",
        ] {
            let ip: std::net::Ipv6Addr = v6.parse().unwrap();
            let text = format_ip_for_xff(IpAddr::V6(ip));
            assert_eq!(text.as_bytes(), ip.to_string().as_bytes());
        }
    }

    #[test]
    fn trust_and_hop_lookup() {
        assert!(is_trust_header(b"X-Forwarded-For"));
        assert!(is_trust_header(b"X-OVN-NETWORK-ID"));
        assert!(!is_trust_header(b"x-forwarded-for2"));
        assert!(is_trust_header(b"X_Forwarded_For"));
        assert!(is_trust_header(b"x_neutron-network_ID"));
        assert!(!is_trust_header(b"X__Forwarded_For"));
        assert!(!is_trust_header(b"X-Forwarded_For2"));
        assert!(!is_trust_header(b"Transfer-Encoding"));
        assert!(is_hop_by_hop(b"TE"));
        assert!(!is_hop_by_hop(b"transfer-encoding"));
    }
}
