//! Small address types the inventory needs: CIDR prefixes and MAC addresses.
//!
//! Hand-rolled rather than pulling an `ipnet` dependency: the inventory only
//! needs parse, contains, network and netmask, and the output formats must
//! match Python's `netaddr`/`ipaddress` text (which `std::net` Display does:
//! dotted quad and RFC 5952 compressed IPv6).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An IP prefix such as `10.0.0.0/24` or `fd00::/64`. Host bits are kept as
/// written; [`Cidr::network`] masks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The address as written (host bits kept).
    pub addr: IpAddr,
    /// Prefix length: 0-32 for IPv4, 0-128 for IPv6.
    pub prefix: u8,
}

impl Cidr {
    /// Parse `addr/prefix`; the prefix must fit the address family.
    pub fn parse(s: &str) -> Option<Cidr> {
        let (a, p) = s.split_once('/')?;
        let addr: IpAddr = a.parse().ok()?;
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let prefix: u8 = p.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Cidr { addr, prefix })
    }

    /// 4 or 6.
    pub fn version(&self) -> u8 {
        if self.addr.is_ipv4() {
            4
        } else {
            6
        }
    }

    fn mask_bits(&self) -> u128 {
        let width = if self.addr.is_ipv4() { 32 } else { 128 };
        if self.prefix == 0 {
            0
        } else {
            (u128::MAX << (width - u32::from(self.prefix))) & width_mask(width)
        }
    }

    /// The netmask as an address (`255.255.255.0`, `ffff:ffff:ffff:ffff::`).
    pub fn netmask(&self) -> IpAddr {
        to_ip(self.addr.is_ipv4(), self.mask_bits())
    }

    /// The network address (host bits cleared).
    pub fn network(&self) -> IpAddr {
        to_ip(self.addr.is_ipv4(), to_bits(self.addr) & self.mask_bits())
    }

    /// Whether `ip` lies in this prefix (same family only; no v4-mapped magic).
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4()
            && (to_bits(ip) & self.mask_bits()) == (to_bits(self.addr) & self.mask_bits())
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn width_mask(width: u32) -> u128 {
    if width == 128 {
        u128::MAX
    } else {
        (1u128 << width) - 1
    }
}

fn to_bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn to_ip(v4: bool, bits: u128) -> IpAddr {
    if v4 {
        // Only the low 32 bits are ever set for IPv4 (masked by width_mask).
        IpAddr::V4(Ipv4Addr::from(
            u32::try_from(bits & 0xffff_ffff).unwrap_or(0),
        ))
    } else {
        IpAddr::V6(Ipv6Addr::from(bits))
    }
}

/// Parse `aa:bb:cc:dd:ee:ff` (either case). The one MAC parser: Neutron's
/// ports, the inventory, Nova's info cache and OVN's `Port_Binding.mac`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut out {
        let part = parts.next()?;
        // `from_str_radix` alone would accept a sign ("+3").
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Lowercase colon-separated MAC text, as Neutron reports it.
pub fn format_mac(mac: &[u8; 6]) -> String {
    Mac(mac).to_string()
}

/// A MAC address as `format_mac` writes it (`fa:16:3e:00:00:01`), for
/// writing into a buffer without a `String` of its own.
pub struct Mac<'a>(pub &'a [u8; 6]);

impl std::fmt::Display for Mac<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = [b':'; 17];
        for (i, b) in self.0.iter().enumerate() {
            s[3 * i] = HEX[usize::from(b >> 4)];
            s[3 * i + 1] = HEX[usize::from(b & 0xf)];
        }
        // Only hex digits and colons are written.
        f.write_str(std::str::from_utf8(&s).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_basics() {
        let c = Cidr::parse("10.10.0.0/24").unwrap();
        assert_eq!(c.netmask().to_string(), "255.255.255.0");
        assert!(c.contains("10.10.0.11".parse().unwrap()));
        assert!(!c.contains("10.10.1.11".parse().unwrap()));
        let z = Cidr::parse("0.0.0.0/0").unwrap();
        assert_eq!(z.netmask().to_string(), "0.0.0.0");
        assert!(z.contains("1.2.3.4".parse().unwrap()));
        let v6 = Cidr::parse("fd00:10::/64").unwrap();
        assert_eq!(v6.netmask().to_string(), "ffff:ffff:ffff:ffff::");
        assert_eq!(v6.version(), 6);
        assert!(v6.contains("fd00:10::1".parse().unwrap()));
        assert_eq!(
            Cidr::parse("10.1.2.3/16").unwrap().network().to_string(),
            "10.1.0.0"
        );
        assert!(Cidr::parse("10.0.0.0/33").is_none());
        assert!(Cidr::parse("10.0.0.0").is_none());
        assert!(Cidr::parse("10.0.0.0/+8").is_none());
        assert_eq!(
            Cidr::parse("::/128").unwrap().netmask().to_string(),
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        );
    }

    #[test]
    fn mac_roundtrip() {
        let m = parse_mac("FA:16:3e:b1:b2:36").unwrap();
        assert_eq!(format_mac(&m), "fa:16:3e:b1:b2:36");
        assert!(parse_mac("fa:16:3e:b1:b2").is_none());
        assert!(parse_mac("fa:16:3e:b1:b2:36:00").is_none());
        assert!(parse_mac("fa-16-3e-b1-b2-36").is_none());
    }
}
