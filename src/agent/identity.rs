//! Who is asking: the guest's scope (router or network) and lookup key.
//!
//! The namespace proxy strips every client-supplied trust header and stamps
//! its own `X-Forwarded-For` plus exactly one router or network id, so by the
//! time a request reaches the agent anything unusual in those headers is a
//! bug or an attack. We therefore fail closed with 400 on every ambiguity:
//! a repeated header, a comma list, a port, brackets, a zone id, an id that is
//! not hex-and-dashes. Neutron's Python agent is more lenient (it takes the
//! first value webob hands it), and that leniency is what we rejected: a
//! lookup on the wrong address would sign another tenant's instance id.
//!
//! The address rules follow `neutron/agent/metadata/proxy_base.py`: an
//! IPv4-mapped IPv6 address is looked up as IPv4, and a link-local IPv6
//! address with an EUI-64 interface id is looked up by the MAC it encodes.
//! The raw (trimmed) `X-Forwarded-For` value is kept for Nova, which uses it
//! as the fallback `local-ipv4`.

use std::net::{IpAddr, Ipv6Addr};

use smallvec::SmallVec;

/// The header carrying the guest address, stamped by the namespace proxy.
pub const HEADER_FORWARDED_FOR: &str = "X-Forwarded-For";
/// Router id header (ML2/OVS L3 agent namespaces).
pub const HEADER_ROUTER_ID: &str = "X-Neutron-Router-ID";
/// Network id header (ML2/OVS DHCP namespaces).
pub const HEADER_NETWORK_ID: &str = "X-Neutron-Network-ID";
/// Network id header used by the OVN metadata agent's haproxy.
pub const HEADER_OVN_NETWORK_ID: &str = "X-OVN-Network-ID";
/// Longest router or network id accepted (UUIDs are 36 chars).
pub const MAX_ID_CHARS: usize = 64;

/// A short text of the identity (a router or network id, the raw
/// `X-Forwarded-For`), held inline: parsing a request's identity allocates
/// nothing (`tests/alloc_counts.rs`). At most [`MAX_ID_CHARS`] bytes, which
/// bounds the ids already and is more than the longest address text
/// `IpAddr` parses (45).
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdText(arrayvec::ArrayString<MAX_ID_CHARS>);

impl IdText {
    /// `s` if it fits.
    pub fn new(s: &str) -> Option<IdText> {
        arrayvec::ArrayString::from(s).ok().map(IdText)
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for IdText {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for IdText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Debug for IdText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

/// Where the request came from: a router namespace or a network namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Router id; the guest may be on any network attached to the router.
    Router(IdText),
    /// Network id; the guest is on exactly this network.
    Network(IdText),
}

impl Scope {
    /// The router or network id.
    pub fn id(&self) -> &str {
        match self {
            Scope::Router(id) | Scope::Network(id) => id,
        }
    }
}

/// What to look the guest's port up by.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LookupKey {
    /// A fixed IP of the port (IPv4-mapped IPv6 already unmapped).
    Ip(IpAddr),
    /// The port's MAC, derived from a link-local EUI-64 address.
    Mac([u8; 6]),
}

impl LookupKey {
    /// The key Neutron's agent would use for a guest address: IPv4-mapped
    /// IPv6 becomes IPv4, link-local IPv6 with an EUI-64 suffix becomes a MAC.
    pub fn from_addr(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(v4) => LookupKey::Ip(IpAddr::V4(v4)),
            IpAddr::V6(v6) => {
                if let Some(v4) = v6.to_ipv4_mapped() {
                    LookupKey::Ip(IpAddr::V4(v4))
                } else if let Some(mac) = mac_from_eui64(v6) {
                    LookupKey::Mac(mac)
                } else {
                    LookupKey::Ip(IpAddr::V6(v6))
                }
            }
        }
    }
}

/// The resolved request identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Router or network the request arrived through.
    pub scope: Scope,
    /// IP or MAC to find the port by.
    pub key: LookupKey,
    /// The raw `X-Forwarded-For` value, trimmed; forwarded to Nova unchanged.
    pub xff: IdText,
}

/// Why the identity headers were rejected. Every variant is a 400.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    /// No `X-Forwarded-For` header.
    #[error("X-Forwarded-For header is missing.")]
    MissingForwardedFor,
    /// `X-Forwarded-For` is not exactly one IP address.
    #[error("X-Forwarded-For is not a single IP address.")]
    BadForwardedFor,
    /// Both a router and a network id were given (Neutron era C wording).
    #[error("Both network {network} and router {router} defined.")]
    BothRouterAndNetwork {
        /// The router id.
        router: String,
        /// The network id.
        network: String,
    },
    /// `X-Neutron-Network-ID` and `X-OVN-Network-ID` disagree.
    #[error("Conflicting network ids {neutron} and {ovn}.")]
    ConflictingNetworks {
        /// Value of `X-Neutron-Network-ID`.
        neutron: String,
        /// Value of `X-OVN-Network-ID`.
        ovn: String,
    },
    /// Neither a router nor a network id was given.
    #[error("Neither a router nor a network id is defined.")]
    NoRouterOrNetwork,
    /// The named header appeared more than once.
    #[error("Header {0} is repeated.")]
    DuplicateHeader(&'static str),
    /// The named id header is empty, too long or not `[0-9a-fA-F-]`.
    #[error("Header {0} is not a valid id.")]
    BadId(&'static str),
}

impl IdentityError {
    /// HTTP status for the guest: always 400.
    pub fn status(&self) -> u16 {
        400
    }

    /// Human-readable explanation for the error page. Safe to echo: ids in
    /// it have already passed [`IdentityError::BadId`] validation.
    pub fn message(&self) -> String {
        self.to_string()
    }
}

/// Parse the agent-facing identity headers.
///
/// `get_all(name)` returns every value of that header (case-insensitive
/// name), in order; it is called with the `HEADER_*` constants of this module.
///
/// # Errors
///
/// Any [`IdentityError`]; see the module docs for the fail-closed rules.
pub fn parse_identity<'a>(
    get_all: impl Fn(&str) -> SmallVec<[&'a [u8]; 2]>,
) -> Result<Identity, IdentityError> {
    // Order: repetition, then id syntax, then combination, then address. Ids
    // are validated before they can appear in an error message.
    let router = single_id(&get_all, HEADER_ROUTER_ID)?;
    let neutron_net = single_id(&get_all, HEADER_NETWORK_ID)?;
    let ovn_net = single_id(&get_all, HEADER_OVN_NETWORK_ID)?;
    let xff_values = get_all(HEADER_FORWARDED_FOR);

    let network = match (neutron_net, ovn_net) {
        (Some(a), Some(b)) if a != b => {
            return Err(IdentityError::ConflictingNetworks {
                neutron: a.to_string(),
                ovn: b.to_string(),
            })
        }
        (Some(a), _) => Some(a),
        (None, b) => b,
    };
    let scope = match (router, network) {
        (Some(router), Some(network)) => {
            return Err(IdentityError::BothRouterAndNetwork {
                router: router.to_string(),
                network: network.to_string(),
            })
        }
        (Some(r), None) => Scope::Router(r),
        (None, Some(n)) => Scope::Network(n),
        (None, None) => return Err(IdentityError::NoRouterOrNetwork),
    };

    let raw = match xff_values.as_slice() {
        [] => return Err(IdentityError::MissingForwardedFor),
        [one] => *one,
        _ => return Err(IdentityError::DuplicateHeader(HEADER_FORWARDED_FOR)),
    };
    let xff = std::str::from_utf8(raw)
        .map_err(|_| IdentityError::BadForwardedFor)?
        .trim_matches(|c: char| c == ' ' || c == '\t');
    // `IpAddr::from_str` rejects lists, ports, brackets and zone ids.
    let addr: IpAddr = xff.parse().map_err(|_| IdentityError::BadForwardedFor)?;
    Ok(Identity {
        scope,
        key: LookupKey::from_addr(addr),
        xff: IdText::new(xff).ok_or(IdentityError::BadForwardedFor)?,
    })
}

/// The single, validated value of an id header, or `None` if absent.
fn single_id<'a>(
    get_all: &impl Fn(&str) -> SmallVec<[&'a [u8]; 2]>,
    name: &'static str,
) -> Result<Option<IdText>, IdentityError> {
    let values = get_all(name);
    let raw = match values.as_slice() {
        [] => return Ok(None),
        [one] => *one,
        _ => return Err(IdentityError::DuplicateHeader(name)),
    };
    let trimmed = raw.trim_ascii();
    let valid = !trimmed.is_empty()
        && trimmed.len() <= MAX_ID_CHARS
        && trimmed.iter().all(|&b| b.is_ascii_hexdigit() || b == b'-');
    if !valid {
        return Err(IdentityError::BadId(name));
    }
    // Only ASCII of at most `MAX_ID_CHARS` survived validation, so neither
    // can fail.
    let id = std::str::from_utf8(trimmed).map_err(|_| IdentityError::BadId(name))?;
    Ok(Some(IdText::new(id).ok_or(IdentityError::BadId(name))?))
}

/// The MAC encoded in a link-local (fe80::/10) EUI-64 address, if any.
///
/// The interface id must carry `ff:fe` in its middle two bytes; the
/// universal/local bit of the first byte is flipped back.
pub fn mac_from_eui64(addr: Ipv6Addr) -> Option<[u8; 6]> {
    if addr.segments()[0] & 0xffc0 != 0xfe80 {
        return None;
    }
    let o = addr.octets();
    if o[11] != 0xff || o[12] != 0xfe {
        return None;
    }
    Some([o[8] ^ 0x02, o[9], o[10], o[13], o[14], o[15]])
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use smallvec::smallvec;

    use super::*;

    const R: &str = "6ef9cfc2-8af2-49a4-a9d3-d7e344c927f8";
    const N: &str = "3636b40f-3e32-48da-8a7d-266006b19663";
    const N2: &str = "81856d96-d47f-4782-8a78-0379124f58eb";

    /// Parse a request whose headers are `(name, value)` pairs.
    fn parse(headers: &[(&str, &str)]) -> Result<Identity, IdentityError> {
        let headers: Vec<(&str, &[u8])> = headers.iter().map(|(n, v)| (*n, v.as_bytes())).collect();
        parse_identity(|name| {
            headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| *v)
                .collect()
        })
    }

    fn with_xff(xff: &str) -> Result<Identity, IdentityError> {
        parse(&[("x-forwarded-for", xff), ("X-Neutron-Network-ID", N)])
    }

    fn ip(s: &str) -> LookupKey {
        LookupKey::Ip(s.parse().unwrap())
    }

    #[test]
    fn xff_forms() {
        use IdentityError::BadForwardedFor as Bad;
        let mac = LookupKey::Mac([0xfa, 0x16, 0x3e, 0x12, 0x34, 0x56]);
        let table: Vec<(&str, Result<LookupKey, IdentityError>)> = vec![
            ("10.0.0.5", Ok(ip("10.0.0.5"))),
            ("  10.0.0.5\t", Ok(ip("10.0.0.5"))),
            ("2001:db8::5", Ok(ip("2001:db8::5"))),
            (
                "fd00:10::f816:3eff:feb1:b236",
                Ok(ip("fd00:10::f816:3eff:feb1:b236")),
            ),
            ("::ffff:10.0.0.5", Ok(ip("10.0.0.5"))),
            ("::FFFF:10.0.0.5", Ok(ip("10.0.0.5"))),
            ("fe80::f816:3eff:fe12:3456", Ok(mac.clone())),
            ("FE80::F816:3EFF:FE12:3456", Ok(mac)),
            // Recorded fixture vm1: fa:16:3e:b1:b2:36.
            (
                "fe80::f816:3eff:feb1:b236",
                Ok(LookupKey::Mac([0xfa, 0x16, 0x3e, 0xb1, 0xb2, 0x36])),
            ),
            // The U/L bit flips back: 02 in the address is a universal MAC 00:..
            (
                "fe80::0211:22ff:fe33:4455",
                Ok(LookupKey::Mac([0x00, 0x11, 0x22, 0x33, 0x44, 0x55])),
            ),
            // Link-local without ff:fe (privacy / stable-opaque): look up by IP.
            ("fe80::1", Ok(ip("fe80::1"))),
            (
                "fe80::f816:3eff:fd12:3456",
                Ok(ip("fe80::f816:3eff:fd12:3456")),
            ),
            // ff:fe outside fe80::/10 is an ordinary address.
            (
                "2001:db8::f816:3eff:fe12:3456",
                Ok(ip("2001:db8::f816:3eff:fe12:3456")),
            ),
            ("", Err(Bad)),
            ("   ", Err(Bad)),
            ("10.0.0.5, 10.0.0.6", Err(Bad)),
            ("10.0.0.5,10.0.0.6", Err(Bad)),
            ("10.0.0.5 10.0.0.6", Err(Bad)),
            ("10.0.0.5:8080", Err(Bad)),
            ("[2001:db8::5]", Err(Bad)),
            ("[2001:db8::5]:80", Err(Bad)),
            ("fe80::1%eth0", Err(Bad)),
            ("10.0.0.256", Err(Bad)),
            ("010.0.0.5", Err(Bad)),
            ("unknown", Err(Bad)),
            ("10.0.0.5\r\nX-Evil: 1", Err(Bad)),
        ];
        for (xff, want) in table {
            let got = with_xff(xff).map(|id| id.key);
            assert_eq!(got, want, "XFF {xff:?}");
        }
    }

    #[test]
    fn xff_is_kept_raw_but_trimmed() {
        let id = with_xff(" ::ffff:10.0.0.5 ").unwrap();
        assert_eq!(id.xff.as_str(), "::ffff:10.0.0.5");
        assert_eq!(id.key, ip("10.0.0.5"));
    }

    #[test]
    fn xff_not_utf8_is_bad() {
        let got = parse_identity(|name| {
            if name == HEADER_FORWARDED_FOR {
                smallvec![&b"10.0.0.\xff"[..]]
            } else if name == HEADER_ROUTER_ID {
                smallvec![R.as_bytes()]
            } else {
                SmallVec::new()
            }
        });
        assert_eq!(got, Err(IdentityError::BadForwardedFor));
    }

    #[test]
    fn xff_missing_or_duplicated() {
        assert_eq!(
            parse(&[(HEADER_ROUTER_ID, R)]),
            Err(IdentityError::MissingForwardedFor)
        );
        assert_eq!(
            parse(&[
                (HEADER_ROUTER_ID, R),
                ("X-Forwarded-For", "10.0.0.5"),
                ("x-forwarded-for", "10.0.0.5"),
            ]),
            Err(IdentityError::DuplicateHeader(HEADER_FORWARDED_FOR))
        );
    }

    #[test]
    fn header_combinations() {
        use IdentityError as E;
        let xff = ("X-Forwarded-For", "10.0.0.5");
        let r = (HEADER_ROUTER_ID, R);
        let n = (HEADER_NETWORK_ID, N);
        let o = (HEADER_OVN_NETWORK_ID, N);
        let o2 = (HEADER_OVN_NETWORK_ID, N2);
        let both = E::BothRouterAndNetwork {
            router: R.into(),
            network: N.into(),
        };
        let router = Ok(Scope::Router(IdText::new(R).unwrap()));
        let network = Ok(Scope::Network(IdText::new(N).unwrap()));
        let too_long = "a".repeat(MAX_ID_CHARS + 1);
        let longest = "A".repeat(MAX_ID_CHARS);
        type Case<'h> = (Vec<(&'h str, &'h str)>, Result<Scope, E>);
        let table: Vec<Case> = vec![
            (vec![xff], Err(E::NoRouterOrNetwork)),
            (vec![xff, r], router),
            (vec![xff, n], network.clone()),
            (vec![xff, o], network.clone()),
            (vec![xff, n, o], network),
            (
                vec![xff, n, o2],
                Err(E::ConflictingNetworks {
                    neutron: N.into(),
                    ovn: N2.into(),
                }),
            ),
            (vec![xff, r, n], Err(both.clone())),
            (vec![xff, r, o], Err(both.clone())),
            (vec![xff, r, n, o], Err(both)),
            (vec![xff, r, r], Err(E::DuplicateHeader(HEADER_ROUTER_ID))),
            (vec![xff, n, n], Err(E::DuplicateHeader(HEADER_NETWORK_ID))),
            (
                vec![xff, o, o],
                Err(E::DuplicateHeader(HEADER_OVN_NETWORK_ID)),
            ),
            // Repetition wins over combination errors.
            (
                vec![xff, r, n, n],
                Err(E::DuplicateHeader(HEADER_NETWORK_ID)),
            ),
            // Bad ids win over combination errors (never echo garbage).
            (
                vec![xff, (HEADER_ROUTER_ID, "<script>"), n],
                Err(E::BadId(HEADER_ROUTER_ID)),
            ),
            (
                vec![xff, (HEADER_NETWORK_ID, "")],
                Err(E::BadId(HEADER_NETWORK_ID)),
            ),
            (
                vec![xff, (HEADER_NETWORK_ID, "  ")],
                Err(E::BadId(HEADER_NETWORK_ID)),
            ),
            (
                vec![xff, (HEADER_OVN_NETWORK_ID, "abc,def")],
                Err(E::BadId(HEADER_OVN_NETWORK_ID)),
            ),
            (
                vec![xff, (HEADER_ROUTER_ID, too_long.as_str())],
                Err(E::BadId(HEADER_ROUTER_ID)),
            ),
            (
                vec![xff, (HEADER_ROUTER_ID, longest.as_str())],
                Ok(Scope::Router(IdText::new(&longest).unwrap())),
            ),
            (
                vec![xff, (HEADER_ROUTER_ID, " abc-DEF ")],
                Ok(Scope::Router(IdText::new("abc-DEF").unwrap())),
            ),
        ];
        for (headers, want) in table {
            let got = parse(&headers).map(|id| id.scope);
            assert_eq!(got, want, "headers {headers:?}");
        }
    }

    #[test]
    fn header_names_are_case_insensitive_for_the_caller() {
        let id = parse(&[("x-neutron-router-id", R), ("X-FORWARDED-FOR", "10.0.0.5")]).unwrap();
        assert_eq!(id.scope, Scope::Router(IdText::new(R).unwrap()));
        assert_eq!(id.scope.id(), R);
        assert_eq!(
            id.key,
            LookupKey::Ip(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)))
        );
    }

    #[test]
    fn both_message_is_neutrons() {
        let err = parse(&[
            ("X-Forwarded-For", "10.0.0.5"),
            (HEADER_ROUTER_ID, R),
            (HEADER_NETWORK_ID, N),
        ])
        .unwrap_err();
        assert_eq!(err.status(), 400);
        assert_eq!(
            err.message(),
            format!("Both network {N} and router {R} defined.")
        );
    }

    #[test]
    fn all_errors_are_400() {
        let errs = [
            IdentityError::MissingForwardedFor,
            IdentityError::BadForwardedFor,
            IdentityError::NoRouterOrNetwork,
            IdentityError::DuplicateHeader(HEADER_ROUTER_ID),
            IdentityError::BadId(HEADER_ROUTER_ID),
        ];
        for e in errs {
            assert_eq!(e.status(), 400);
            assert!(!e.message().is_empty());
        }
    }

    #[test]
    fn eui64_vectors() {
        let f = |s: &str| mac_from_eui64(s.parse().unwrap());
        assert_eq!(
            f("fe80::f816:3eff:fe12:3456"),
            Some([0xfa, 0x16, 0x3e, 0x12, 0x34, 0x56])
        );
        // fe80::/10 includes febf::.
        assert_eq!(
            f("febf::f816:3eff:fe12:3456"),
            Some([0xfa, 0x16, 0x3e, 0x12, 0x34, 0x56])
        );
        assert_eq!(f("fec0::f816:3eff:fe12:3456"), None);
        assert_eq!(f("fe80::f816:3eff:fe12"), None);
        assert_eq!(f("::1"), None);
    }
}
