//! The address grammar shared by `WEAVE_CIDR`, `weave attach/detach/expose/hide` and the router
//! API (pure): `[ip:]<a.b.c.d>/<len>` claims exactly that address, `net:<cidr>` and
//! `net:default` ask IPAM for one.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An IPv4 address with its prefix length, e.g. `10.35.1.1/24` (host bits kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

/// One element of the grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddrSpec {
    /// `10.2.1.1/24` or `ip:10.2.1.1/24`: exactly this address.
    Explicit(Ipv4Cidr),
    /// `net:10.2.3.0/24`: some address inside this subnet (normalised to the network address).
    Subnet(Ipv4Cidr),
    /// `net:default`: some address in the default subnet.
    DefaultSubnet,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    #[error("invalid CIDR {0:?}: expected a.b.c.d/len with len 0-32")]
    InvalidCidr(String),
    #[error("invalid address {0:?}: expected [ip:]a.b.c.d/len, net:a.b.c.d/len or net:default")]
    InvalidSpec(String),
}

impl Ipv4Cidr {
    pub fn new(addr: Ipv4Addr, prefix_len: u8) -> Result<Self, AddrError> {
        if prefix_len > 32 {
            return Err(AddrError::InvalidCidr(format!("{addr}/{prefix_len}")));
        }
        Ok(Self { addr, prefix_len })
    }

    /// The subnet mask as a u32 (`/24` → `0xffffff00`).
    pub fn mask(&self) -> u32 {
        match self.prefix_len {
            0 => 0,
            n => u32::MAX << (32 - u32::from(n)),
        }
    }

    /// The same prefix with the host bits cleared (`10.2.1.7/24` → `10.2.1.0/24`).
    pub fn network(&self) -> Ipv4Cidr {
        Ipv4Cidr {
            addr: Ipv4Addr::from(u32::from(self.addr) & self.mask()),
            prefix_len: self.prefix_len,
        }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = AddrError;

    /// Strict: a dotted quad, `/`, and a length of one or two digits in 0..=32.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || AddrError::InvalidCidr(s.to_string());
        let (ip, len) = s.split_once('/').ok_or_else(bad)?;
        if len.is_empty() || len.len() > 2 || !len.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let addr: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        let prefix_len: u8 = len.parse().map_err(|_| bad())?;
        Ipv4Cidr::new(addr, prefix_len).map_err(|_| bad())
    }
}

/// `--trusted-subnets a/b,c/d` (spec router §2.9): comma-separated CIDRs, each normalised to its
/// network as Go's `net.ParseCIDR` does (`10.1.2.3/8` → `10.0.0.0/8`); blanks around items and
/// empty items are ignored, so `""` is the empty list.
pub fn parse_cidr_list(s: &str) -> Result<Vec<Ipv4Cidr>, AddrError> {
    s.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| item.parse::<Ipv4Cidr>().map(|c| c.network()))
        .collect()
}

impl fmt::Display for AddrSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddrSpec::Explicit(cidr) => write!(f, "{cidr}"),
            AddrSpec::Subnet(cidr) => write!(f, "net:{cidr}"),
            AddrSpec::DefaultSubnet => f.write_str("net:default"),
        }
    }
}

impl FromStr for AddrSpec {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "net:default" {
            return Ok(AddrSpec::DefaultSubnet);
        }
        if let Some(net) = s.strip_prefix("net:") {
            return Ok(AddrSpec::Subnet(net.parse::<Ipv4Cidr>()?.network()));
        }
        let cidr = s.strip_prefix("ip:").unwrap_or(s);
        if !cidr.contains('/') {
            return Err(AddrError::InvalidSpec(s.to_string()));
        }
        Ok(AddrSpec::Explicit(cidr.parse()?))
    }
}

/// On the wire an `AddrSpec` is its textual form, so API bodies read like the CLI.
impl Serialize for AddrSpec {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for AddrSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cidr_lists() {
        let list = parse_cidr_list("10.1.2.3/8, 192.168.0.0/16,").expect("valid list");
        assert_eq!(
            list.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["10.0.0.0/8", "192.168.0.0/16"]
        );
        assert!(list[0].contains(Ipv4Addr::new(10, 200, 0, 1)));
        assert_eq!(parse_cidr_list("").expect("empty"), vec![]);
        assert_eq!(
            parse_cidr_list("10.0.0.0/8,bogus").expect_err("invalid item"),
            AddrError::InvalidCidr("bogus".into())
        );
        assert!(parse_cidr_list("10.0.0.0/33").is_err());
        assert!(parse_cidr_list("10.0.0.0").is_err());
    }

    #[test]
    fn parses_every_form() {
        let c = |s: &str| s.parse::<Ipv4Cidr>().expect("valid cidr");
        assert_eq!(
            "10.2.1.1/24".parse(),
            Ok(AddrSpec::Explicit(c("10.2.1.1/24")))
        );
        assert_eq!(
            "ip:10.2.1.1/24".parse(),
            Ok(AddrSpec::Explicit(c("10.2.1.1/24")))
        );
        assert_eq!(
            "net:10.2.3.7/24".parse(),
            Ok(AddrSpec::Subnet(c("10.2.3.0/24")))
        );
        assert_eq!("net:default".parse(), Ok(AddrSpec::DefaultSubnet));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "10.2.1.1",
            "10.2.1.1/33",
            "10.2.1/24",
            "10.2.1.1/",
            "10.2.1.1/024",
            "net:",
            "net:foo",
            "ip:",
            "none",
            "10.2.1.1/2a",
            "1.2.3.4/ 8",
            "256.1.1.1/8",
        ] {
            assert!(
                bad.parse::<AddrSpec>().is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn contains_and_network() {
        let c: Ipv4Cidr = "10.35.1.9/24".parse().expect("valid");
        assert!(c.contains(Ipv4Addr::new(10, 35, 1, 200)));
        assert!(!c.contains(Ipv4Addr::new(10, 35, 2, 1)));
        assert_eq!(c.network().to_string(), "10.35.1.0/24");
        let all: Ipv4Cidr = "0.0.0.0/0".parse().expect("valid");
        assert!(all.contains(Ipv4Addr::new(1, 2, 3, 4)));
    }

    proptest! {
        #[test]
        fn display_parse_round_trip(ip in any::<u32>(), len in 0u8..=32, kind in 0u8..3) {
            let cidr = Ipv4Cidr::new(Ipv4Addr::from(ip), len).expect("len in range");
            let spec = match kind {
                0 => AddrSpec::Explicit(cidr),
                1 => AddrSpec::Subnet(cidr.network()),
                _ => AddrSpec::DefaultSubnet,
            };
            prop_assert_eq!(spec.to_string().parse::<AddrSpec>(), Ok(spec));
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,40}") {
            let _ = s.parse::<AddrSpec>();
        }
    }
}
