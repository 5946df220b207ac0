//! The NBD server's address allow-list: which TCP peers may connect (the configured
//! primary), as IP addresses or CIDR prefixes. An empty list allows every peer.

use std::net::IpAddr;

/// Peers allowed to connect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList(Vec<(IpAddr, u8)>);

impl AllowList {
    /// True when `peer` matches an entry (or the list is empty).
    pub fn permits(&self, peer: &IpAddr) -> bool {
        if self.0.is_empty() {
            return true;
        }
        let peer = canonical(*peer);
        self.0.iter().any(|(net, bits)| match (net, peer) {
            (IpAddr::V4(n), IpAddr::V4(p)) => prefix_eq(&n.octets(), &p.octets(), *bits),
            (IpAddr::V6(n), IpAddr::V6(p)) => prefix_eq(&n.octets(), &p.octets(), *bits),
            _ => false,
        })
    }

    /// Whether any entry was given.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// IPv4-mapped IPv6 peers (a dual-stack listener) compare as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let full = usize::from(bits / 8);
    if a[..full] != b[..full] {
        return false;
    }
    let rest = bits % 8;
    rest == 0 || (a[full] ^ b[full]) >> (8 - rest) == 0
}

impl std::str::FromStr for AllowList {
    type Err = String;
    /// `ADDR[/BITS][,ADDR[/BITS]...]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut v = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (addr, bits) = match item.split_once('/') {
                Some((a, b)) => (a, Some(b)),
                None => (item, None),
            };
            let ip: IpAddr = addr.parse().map_err(|_| format!("'{addr}' is not an IP address"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let bits = match bits {
                None => max,
                Some(b) => b
                    .parse::<u8>()
                    .ok()
                    .filter(|&b| b <= max)
                    .ok_or_else(|| format!("'/{b}' is not a prefix length for {ip}"))?,
            };
            v.push((canonical(ip), bits));
        }
        if v.is_empty() {
            return Err("empty allow-list".into());
        }
        Ok(AllowList(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_addresses_and_prefixes() {
        let a: AllowList = "10.0.0.2, 192.168.4.0/22,fd00::/8".parse().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(a.permits(&ip("10.0.0.2")));
        assert!(!a.permits(&ip("10.0.0.3")));
        assert!(a.permits(&ip("192.168.7.255")));
        assert!(!a.permits(&ip("192.168.8.1")));
        assert!(a.permits(&ip("fd12::1")));
        assert!(!a.permits(&ip("fe80::1")));
        assert!(a.permits(&ip("::ffff:10.0.0.2")));
        assert!(AllowList::default().permits(&ip("1.2.3.4")));
        assert!("10.0.0.1/33".parse::<AllowList>().is_err());
        assert!("host.example".parse::<AllowList>().is_err());
        assert!("".parse::<AllowList>().is_err());
    }
}
