//! The address policy of API.md §9 as a pure function over `IpAddr`, plus the operator's
//! exceptions (`fetch.allow`).
//!
//! Written by hand because the standard library's `is_global` is unstable and no
//! well-kept crate classifies every special-purpose block (IANA's IPv4 and IPv6
//! special-purpose registries) including the IPv6 forms that embed an IPv4 address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::FetchError;

/// What kind of address an IP is, for the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressClass {
    Public,
    Loopback,
    Private,
    LinkLocal,
    SharedCgnat,
    Multicast,
    Unspecified,
    Broadcast,
    Documentation,
    Benchmarking,
    Reserved,
    UniqueLocal,
    /// An IPv6 tunnel or translation form whose endpoint cannot be checked (Teredo).
    Tunnel,
}

impl AddressClass {
    pub fn is_public(self) -> bool {
        self == AddressClass::Public
    }

    pub fn describe(self) -> &'static str {
        match self {
            AddressClass::Public => "public",
            AddressClass::Loopback => "loopback",
            AddressClass::Private => "private",
            AddressClass::LinkLocal => "link-local",
            AddressClass::SharedCgnat => "shared address space (CGNAT)",
            AddressClass::Multicast => "multicast",
            AddressClass::Unspecified => "unspecified",
            AddressClass::Broadcast => "broadcast",
            AddressClass::Documentation => "documentation",
            AddressClass::Benchmarking => "benchmarking",
            AddressClass::Reserved => "reserved",
            AddressClass::UniqueLocal => "unique-local",
            AddressClass::Tunnel => "tunnel",
        }
    }
}

/// Classifies an address. Pure: no IO, no configuration.
pub fn classify(ip: IpAddr) -> AddressClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], prefix: u32) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    (u32::from(ip) & mask) == (u32::from(Ipv4Addr::from(net)) & mask)
}

fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    use AddressClass::*;
    if ip.is_unspecified() {
        return Unspecified;
    }
    if ip.is_broadcast() {
        return Broadcast;
    }
    let table: &[([u8; 4], u32, AddressClass)] = &[
        ([0, 0, 0, 0], 8, Reserved), // "this network"
        ([10, 0, 0, 0], 8, Private),
        ([100, 64, 0, 0], 10, SharedCgnat),
        ([127, 0, 0, 0], 8, Loopback),
        ([169, 254, 0, 0], 16, LinkLocal), // includes 169.254.169.254, the cloud metadata service
        ([172, 16, 0, 0], 12, Private),
        ([192, 0, 0, 0], 24, Reserved), // IETF protocol assignments
        ([192, 0, 2, 0], 24, Documentation),
        ([192, 31, 196, 0], 24, Reserved), // AS112
        ([192, 52, 193, 0], 24, Reserved), // AMT
        ([192, 88, 99, 0], 24, Reserved),  // 6to4 relay anycast
        ([192, 168, 0, 0], 16, Private),
        ([192, 175, 48, 0], 24, Reserved), // direct delegation AS112
        ([198, 18, 0, 0], 15, Benchmarking),
        ([198, 51, 100, 0], 24, Documentation),
        ([203, 0, 113, 0], 24, Documentation),
        ([224, 0, 0, 0], 4, Multicast),
        ([240, 0, 0, 0], 4, Reserved),
    ];
    table
        .iter()
        .find(|(net, prefix, _)| in_v4(ip, *net, *prefix))
        .map(|(_, _, class)| *class)
        .unwrap_or(Public)
}

fn embedded_v4(seg: &[u16; 8], from_segment: usize) -> Ipv4Addr {
    let hi = seg[from_segment];
    let lo = seg[from_segment + 1];
    Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8)
}

fn classify_v6(ip: Ipv6Addr) -> AddressClass {
    use AddressClass::*;
    let s = ip.segments();
    if ip.is_unspecified() {
        return Unspecified;
    }
    if ip.is_loopback() {
        return Loopback;
    }
    // ::ffff:a.b.c.d (mapped) and ::a.b.c.d (compatible): judged by their IPv4 address.
    if s[..5] == [0, 0, 0, 0, 0] && (s[5] == 0xffff || s[5] == 0) {
        return classify_v4(embedded_v4(&s, 6));
    }
    // NAT64 well-known prefix 64:ff9b::/96: judged by the IPv4 address it translates to.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return classify_v4(embedded_v4(&s, 6));
    }
    // 6to4 2002::/16 embeds the IPv4 address in bits 16..48.
    if s[0] == 0x2002 {
        return classify_v4(embedded_v4(&s, 1));
    }
    if s[0] == 0x2001 && s[1] == 0 {
        return Tunnel; // Teredo 2001::/32
    }
    if s[0] == 0x2001 && s[1] == 0x0db8 {
        return Documentation;
    }
    if s[0] == 0x3fff && s[1] & 0xf000 == 0 {
        return Documentation; // 3fff::/20
    }
    if s[0] == 0x2001 && s[1] == 2 && s[2] == 0 {
        return Benchmarking; // 2001:2::/48
    }
    if s[0] == 0x2001 && (0x10..=0x2f).contains(&s[1]) {
        return Reserved; // ORCHID and ORCHIDv2
    }
    if s[0] == 0x0064 && s[1] == 0xff9b && s[2] == 1 {
        return Reserved; // local-use NAT64 64:ff9b:1::/48
    }
    if s[..4] == [0x0100, 0, 0, 0] {
        return Reserved; // discard-only 100::/64
    }
    match s[0] {
        x if x & 0xfe00 == 0xfc00 => UniqueLocal, // fc00::/7
        x if x & 0xffc0 == 0xfe80 => LinkLocal,   // fe80::/10
        x if x & 0xffc0 == 0xfec0 => Reserved,    // site-local fec0::/10, deprecated
        x if x & 0xff00 == 0xff00 => Multicast,   // ff00::/8
        x if x & 0xe000 == 0x2000 => Public,      // global unicast 2000::/3
        _ => Reserved,
    }
}

/// The policy: public addresses, plus what `fetch.allow` names.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    hosts: Vec<String>,
    nets: Vec<IpNet>,
}

impl AddressPolicy {
    /// Builds the policy from `fetch.allow` entries: host names, CIDRs, or bare IPs.
    pub fn new(allow: &[String]) -> Result<Self, FetchError> {
        let mut p = Self::default();
        for entry in allow {
            let e = entry.trim();
            if e.is_empty() {
                return Err(FetchError::Config("fetch.allow has an empty entry".into()));
            }
            if let Ok(net) = e.parse::<IpNet>() {
                p.nets.push(net);
            } else if let Ok(ip) = e.parse::<IpAddr>() {
                p.nets.push(IpNet::from(ip));
            } else if e.contains('/')
                || !e
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            {
                return Err(FetchError::Config(format!(
                    "fetch.allow entry {e:?} is neither a host name nor a CIDR"
                )));
            } else {
                p.hosts.push(e.to_ascii_lowercase());
            }
        }
        Ok(p)
    }

    /// Whether `host` (a URL's host name) is exempt by name.
    pub fn host_allowed(&self, host: &str) -> bool {
        let h = host.trim_end_matches('.').to_ascii_lowercase();
        self.hosts.contains(&h)
    }

    /// Whether a connection to `ip`, reached through `host`, is allowed.
    pub fn check(&self, host: &str, ip: IpAddr) -> Result<(), FetchError> {
        let ip = canonical(ip);
        if self.host_allowed(host) || self.nets.iter().any(|n| n.contains(&ip)) {
            return Ok(());
        }
        let class = classify(ip);
        if class.is_public() {
            return Ok(());
        }
        Err(FetchError::Blocked {
            host: host.to_string(),
            ip: Some(ip),
            why: class.describe().to_string(),
        })
    }
}

/// IPv4-mapped IPv6 addresses as their IPv4 form, so `127.0.0.1/32` also matches `::ffff:127.0.0.1`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn c(s: &str) -> AddressClass {
        classify(s.parse().unwrap())
    }

    #[test]
    fn named_cases() {
        use AddressClass::*;
        for (ip, want) in [
            ("8.8.8.8", Public),
            ("1.1.1.1", Public),
            ("93.184.216.34", Public),
            ("127.0.0.1", Loopback),
            ("127.255.0.9", Loopback),
            ("10.1.2.3", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("172.32.0.1", Public),
            ("192.168.1.1", Private),
            ("169.254.169.254", LinkLocal),
            ("100.64.0.1", SharedCgnat),
            ("100.127.255.255", SharedCgnat),
            ("100.128.0.1", Public),
            ("0.0.0.0", Unspecified),
            ("0.1.2.3", Reserved),
            ("255.255.255.255", Broadcast),
            ("224.0.0.1", Multicast),
            ("240.0.0.1", Reserved),
            ("192.0.0.8", Reserved),
            ("192.0.2.1", Documentation),
            ("198.18.0.1", Benchmarking),
            ("::", Unspecified),
            ("::1", Loopback),
            ("::ffff:127.0.0.1", Loopback),
            ("::ffff:10.0.0.1", Private),
            ("::ffff:169.254.169.254", LinkLocal),
            ("::ffff:8.8.8.8", Public),
            ("::127.0.0.1", Loopback),
            ("64:ff9b::10.0.0.1", Private),
            ("64:ff9b::8.8.8.8", Public),
            ("2002:7f00:1::", Loopback),
            ("2002:0808:0808::1", Public),
            ("2001::1", Tunnel),
            ("2001:db8::1", Documentation),
            ("fc00::1", UniqueLocal),
            ("fd12:3456::1", UniqueLocal),
            ("fe80::1", LinkLocal),
            ("fec0::1", Reserved),
            ("ff02::1", Multicast),
            ("100::1", Reserved),
            ("2606:4700::1111", Public),
            ("2a00:1450:4001::200e", Public),
        ] {
            assert_eq!(c(ip), want, "{ip}");
        }
    }

    #[test]
    fn allow_list() {
        let p =
            AddressPolicy::new(&["127.0.0.1/32".into(), "LocalHost".into(), "::1".into()]).unwrap();
        assert!(p.check("127.0.0.1", "127.0.0.1".parse().unwrap()).is_ok());
        assert!(p.check("x", "::ffff:127.0.0.1".parse().unwrap()).is_ok());
        assert!(p.check("x", "::1".parse().unwrap()).is_ok());
        assert!(p.check("x", "127.0.0.2".parse().unwrap()).is_err());
        assert!(
            p.check("localhost", "127.0.0.2".parse().unwrap()).is_ok(),
            "allowed by host name"
        );
        let e = p
            .check("metadata", "169.254.169.254".parse().unwrap())
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "points to a blocked address 169.254.169.254 (link-local)"
        );
        assert!(AddressPolicy::new(&["10.0.0.0/33".into()]).is_err());
        assert!(AddressPolicy::new(&["bad host!".into()]).is_err());
        assert!(AddressPolicy::default()
            .check("x", "8.8.4.4".parse().unwrap())
            .is_ok());
    }

    fn special_v4(ip: Ipv4Addr) -> bool {
        let o = ip.octets();
        o[0] == 0
            || o[0] == 10
            || o[0] == 127
            || o[0] >= 224
            || (o[0] == 100 && (64..128).contains(&o[1]))
            || (o[0] == 169 && o[1] == 254)
            || (o[0] == 172 && (16..32).contains(&o[1]))
            || (o[0] == 192 && o[1] == 168)
            || (o[0] == 192 && o[1] == 0 && (o[2] == 0 || o[2] == 2))
            || (o[0] == 192 && o[1] == 31 && o[2] == 196)
            || (o[0] == 192 && o[1] == 52 && o[2] == 193)
            || (o[0] == 192 && o[1] == 88 && o[2] == 99)
            || (o[0] == 192 && o[1] == 175 && o[2] == 48)
            || (o[0] == 198 && (o[1] == 18 || o[1] == 19))
            || (o[0] == 198 && o[1] == 51 && o[2] == 100)
            || (o[0] == 203 && o[1] == 0 && o[2] == 113)
    }

    proptest! {
        #[test]
        fn private_ranges_are_never_public(b in any::<[u8; 3]>()) {
            prop_assert_eq!(classify_v4(Ipv4Addr::new(10, b[0], b[1], b[2])), AddressClass::Private);
            prop_assert_eq!(classify_v4(Ipv4Addr::new(127, b[0], b[1], b[2])), AddressClass::Loopback);
            prop_assert_eq!(classify_v4(Ipv4Addr::new(192, 168, b[1], b[2])), AddressClass::Private);
            prop_assert_eq!(classify_v4(Ipv4Addr::new(172, 16 + b[0] % 16, b[1], b[2])), AddressClass::Private);
            prop_assert_eq!(classify_v4(Ipv4Addr::new(169, 254, b[1], b[2])), AddressClass::LinkLocal);
            prop_assert_eq!(classify_v4(Ipv4Addr::new(100, 64 + b[0] % 64, b[1], b[2])), AddressClass::SharedCgnat);
        }

        #[test]
        fn v4_is_public_exactly_outside_the_special_blocks(bits in any::<u32>()) {
            let ip = Ipv4Addr::from(bits);
            prop_assert_eq!(classify_v4(ip).is_public(), !special_v4(ip), "{}", ip);
        }

        #[test]
        fn embedded_v4_forms_classify_as_their_v4(bits in any::<u32>()) {
            let v4 = Ipv4Addr::from(bits);
            let want = classify_v4(v4);
            prop_assert_eq!(classify(IpAddr::V6(v4.to_ipv6_mapped())), want);
            let nat64 = Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, (bits >> 16) as u16, bits as u16);
            prop_assert_eq!(classify(IpAddr::V6(nat64)), want);
            let six_to_four = Ipv6Addr::new(0x2002, (bits >> 16) as u16, bits as u16, 0, 0, 0, 0, 1);
            prop_assert_eq!(classify(IpAddr::V6(six_to_four)), want);
        }

        #[test]
        fn v6_local_blocks_are_never_public(rest in any::<[u16; 7]>(), head in any::<u16>()) {
            let mk = |first: u16| Ipv6Addr::new(first, rest[0], rest[1], rest[2], rest[3], rest[4], rest[5], rest[6]);
            prop_assert_eq!(classify_v6(mk(0xfc00 | (head & 0x01ff))), AddressClass::UniqueLocal);
            prop_assert_eq!(classify_v6(mk(0xfe80 | (head & 0x003f))), AddressClass::LinkLocal);
            prop_assert_eq!(classify_v6(mk(0xff00 | (head & 0x00ff))), AddressClass::Multicast);
            // Nothing outside 2000::/3 is public.
            let first = head;
            if first & 0xe000 != 0x2000 {
                prop_assert!(!classify_v6(mk(first)).is_public());
            }
        }

        #[test]
        fn the_allow_list_admits_exactly_its_networks(bits in any::<u32>()) {
            let p = AddressPolicy::new(&["10.0.0.0/8".into()]).unwrap();
            let ip = IpAddr::V4(Ipv4Addr::from(bits));
            let in_net = bits >> 24 == 10;
            let ok = p.check("h", ip).is_ok();
            prop_assert_eq!(ok, in_net || classify(ip).is_public());
        }
    }
}
