//! `--ipalloc-range`, `--ipalloc-default-subnet` and `--ipalloc-init` (pure): parsed and checked
//! once, by `weave launch` (so mistakes show before anything starts) and by the router.
//! Spec ipam-dns-cli §1.1.

use std::net::Ipv4Addr;
use std::time::Duration;

use weave_api::addr::Ipv4Cidr;

use crate::mesh::peer::PeerName;

/// The universe `weave launch` uses when none is given.
pub const DEFAULT_RANGE: &str = "10.32.0.0/12";
/// Weave's `MinSubnetSize`: a range or subnet has at least four addresses (/30).
pub const MAX_PREFIX_LEN: u8 = 30;

/// How this peer takes part in creating the ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitSpec {
    /// Paxos among the electors, this many of them must agree.
    Consensus { quorum: usize },
    /// The ring is split among exactly these peers, without a vote.
    Seed(Vec<PeerName>),
    /// Never votes; learns the ring from others.
    Observer,
}

/// IPAM's settings, valid by construction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpamSettings {
    /// The universe every peer allocates from.
    pub range: Ipv4Cidr,
    /// Where `net:default` (and no address at all) allocates.
    pub default_subnet: Ipv4Cidr,
    pub init: InitSpec,
    /// How long a request may wait for consensus or space before it fails with the reason.
    pub request_timeout: Duration,
}

/// Hidden: tests shorten the IPAM request timeout with it (seconds).
pub const REQUEST_TIMEOUT_ENV: &str = "WEAVE_IPAM_TIMEOUT";

/// The default request timeout: shorter than the proxy's attach timeout (30 s), so the Docker
/// client sees why, not just "timed out".
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// A `WEAVE_IPAM_TIMEOUT` value (whole seconds, at least 1); `None` if unusable.
pub fn request_timeout_from(value: Option<&str>) -> Option<Duration> {
    let secs: u64 = value?.trim().parse().ok()?;
    (secs > 0).then(|| Duration::from_secs(secs))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamConfigError {
    #[error("invalid --{flag} {value:?}: {why}")]
    Subnet {
        flag: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("--ipalloc-default-subnet {subnet} does not overlap with --ipalloc-range {range}")]
    DefaultSubnetOutside { subnet: Ipv4Cidr, range: Ipv4Cidr },
    #[error("--{0} needs IP address allocation: it cannot be used with --ipalloc-range \"\"")]
    NeedsRange(&'static str),
    #[error("Unable to parse --ipalloc-init: {0}")]
    Init(String),
}

/// A range or subnet: IPv4, host bits zero, at least four addresses.
pub fn parse_subnet(flag: &'static str, value: &str) -> Result<Ipv4Cidr, IpamConfigError> {
    let bad = |why| IpamConfigError::Subnet {
        flag,
        value: value.to_string(),
        why,
    };
    let cidr: Ipv4Cidr = value
        .trim()
        .parse()
        .map_err(|_| bad("expected an IPv4 CIDR such as 10.32.0.0/12"))?;
    if cidr.network() != cidr {
        return Err(bad(
            "invalid subnet - bits after network prefix are not all zero",
        ));
    }
    if cidr.prefix_len > MAX_PREFIX_LEN {
        return Err(bad("invalid subnet - smaller than minimum size 4"));
    }
    Ok(cidr)
}

/// Do the two subnets share an address?
pub fn overlaps(a: &Ipv4Cidr, b: &Ipv4Cidr) -> bool {
    let shorter = a.prefix_len.min(b.prefix_len);
    let mask = match shorter {
        0 => 0,
        n => u32::MAX << (32 - u32::from(n)),
    };
    u32::from(a.addr) & mask == u32::from(b.addr) & mask
}

/// Weave's guess when no `consensus=N` is given: the peers named at launch plus us.
pub fn quorum_for(cluster_size: usize) -> usize {
    cluster_size / 2 + 1
}

/// `--ipalloc-init`; `peers_given` is the number of peers named at launch.
pub fn parse_init(value: Option<&str>, peers_given: usize) -> Result<InitSpec, IpamConfigError> {
    let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(InitSpec::Consensus {
            quorum: quorum_for(peers_given + 1),
        });
    };
    let (mode, param) = match value.split_once('=') {
        Some((mode, param)) => (mode, Some(param)),
        None => (value, None),
    };
    match (mode, param) {
        ("consensus", None) => Ok(InitSpec::Consensus {
            quorum: quorum_for(peers_given + 1),
        }),
        ("consensus", Some(n)) => match n.parse::<usize>() {
            Ok(n) if n > 0 => Ok(InitSpec::Consensus {
                quorum: quorum_for(n),
            }),
            _ => Err(IpamConfigError::Init(format!(
                "consensus needs a positive number of peers, not {n:?}"
            ))),
        },
        ("seed", Some(names)) => {
            let mut peers = Vec::new();
            for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                let peer = name.parse::<PeerName>().map_err(|_| {
                    IpamConfigError::Init(format!("invalid peer name {name:?} in seed"))
                })?;
                if !peers.contains(&peer) {
                    peers.push(peer);
                }
            }
            if peers.is_empty() {
                return Err(IpamConfigError::Init(
                    "seed needs at least one peer name".into(),
                ));
            }
            peers.sort();
            Ok(InitSpec::Seed(peers))
        }
        ("seed", None) => Err(IpamConfigError::Init(
            "seed needs peer names: seed=<name>,<name>...".into(),
        )),
        ("observer", None) => Ok(InitSpec::Observer),
        ("observer", Some(_)) => Err(IpamConfigError::Init("observer takes no parameter".into())),
        (other, _) => Err(IpamConfigError::Init(format!("unknown mode: {other}"))),
    }
}

/// All three flags together; `Ok(None)` when IPAM is off (`--ipalloc-range ""`).
pub fn settings(
    range: &str,
    default_subnet: Option<&str>,
    init: Option<&str>,
    peers_given: usize,
) -> Result<Option<IpamSettings>, IpamConfigError> {
    let default_subnet = default_subnet.filter(|s| !s.trim().is_empty());
    let init = init.filter(|s| !s.trim().is_empty());
    if range.trim().is_empty() {
        if default_subnet.is_some() {
            return Err(IpamConfigError::NeedsRange("ipalloc-default-subnet"));
        }
        if init.is_some() {
            return Err(IpamConfigError::NeedsRange("ipalloc-init"));
        }
        return Ok(None);
    }
    let range = parse_subnet("ipalloc-range", range)?;
    let default_subnet = match default_subnet {
        Some(s) => {
            let subnet = parse_subnet("ipalloc-default-subnet", s)?;
            if !overlaps(&subnet, &range) {
                return Err(IpamConfigError::DefaultSubnetOutside { subnet, range });
            }
            subnet
        }
        None => range,
    };
    Ok(Some(IpamSettings {
        range,
        default_subnet,
        init: parse_init(init, peers_given)?,
        request_timeout: REQUEST_TIMEOUT,
    }))
}

/// One IPv4 route of the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoute {
    pub iface: String,
    pub dest: Ipv4Cidr,
}

/// The routes in `/proc/net/route` (little-endian hex destination and mask per line).
pub fn parse_proc_net_route(text: &str) -> Vec<HostRoute> {
    // The kernel prints the address's bytes as a native u32: little-endian on the hosts we run.
    let hex = |s: &str| u32::from_str_radix(s, 16).ok();
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (iface, dest, mask) = (f.first()?, hex(f.get(1)?)?, hex(f.get(7)?)?);
            let prefix_len = u8::try_from(mask.count_ones()).ok()?;
            Some(HostRoute {
                iface: (*iface).to_string(),
                dest: Ipv4Cidr {
                    addr: Ipv4Addr::from(dest.to_le_bytes()),
                    prefix_len,
                },
            })
        })
        .collect()
}

/// The first route, other than a default route or one through the weave bridge itself, whose
/// destination overlaps `range` (Weave's `netcheck` before launch).
pub fn overlapping_route<'a>(
    range: &Ipv4Cidr,
    routes: &'a [HostRoute],
    bridge: &str,
) -> Option<&'a HostRoute> {
    routes
        .iter()
        .filter(|r| r.dest.prefix_len > 0 && r.iface != bridge)
        .find(|r| overlaps(&r.dest, range))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Ipv4Cidr {
        s.parse().expect("valid cidr")
    }

    #[test]
    fn ranges_are_ipv4_networks_of_at_least_four_addresses() {
        assert_eq!(
            parse_subnet("ipalloc-range", "10.32.0.0/12"),
            Ok(cidr("10.32.0.0/12"))
        );
        assert_eq!(
            parse_subnet("ipalloc-range", "172.30.0.0/30"),
            Ok(cidr("172.30.0.0/30"))
        );
        let why = |v: &str| match parse_subnet("ipalloc-range", v) {
            Err(IpamConfigError::Subnet { why, .. }) => why,
            other => panic!("{v}: {other:?}"),
        };
        assert!(why("10.32.0.1/12").contains("not all zero"));
        assert!(why("10.32.0.0/31").contains("minimum size 4"));
        assert!(why("fd00::/64").contains("IPv4"));
        assert!(why("10.32.0.0").contains("IPv4"));
        let msg = parse_subnet("ipalloc-range", "10.32.0.1/12")
            .expect_err("host bits")
            .to_string();
        assert!(
            msg.contains("--ipalloc-range") && msg.contains("10.32.0.1/12"),
            "{msg}"
        );
    }

    #[test]
    fn init_modes_and_quorum() {
        assert_eq!(parse_init(None, 0), Ok(InitSpec::Consensus { quorum: 1 }));
        // Three hosts each launched with the other two: cluster of 3, quorum 2.
        assert_eq!(parse_init(None, 2), Ok(InitSpec::Consensus { quorum: 2 }));
        assert_eq!(
            parse_init(Some("consensus"), 3),
            Ok(InitSpec::Consensus { quorum: 3 })
        );
        assert_eq!(
            parse_init(Some("consensus=5"), 0),
            Ok(InitSpec::Consensus { quorum: 3 })
        );
        assert_eq!(
            parse_init(Some("consensus=1"), 4),
            Ok(InitSpec::Consensus { quorum: 1 })
        );
        let a: PeerName = "00:00:00:00:00:02".parse().expect("name");
        let b: PeerName = "::1".parse().expect("name");
        assert_eq!(
            parse_init(Some("seed=00:00:00:00:00:02,::1,::2"), 0),
            Ok(InitSpec::Seed(vec![b, a]))
        );
        assert_eq!(parse_init(Some("observer"), 2), Ok(InitSpec::Observer));
        for (bad, needle) in [
            ("consensus=0", "positive"),
            ("consensus=x", "positive"),
            ("seed=", "at least one"),
            ("seed", "needs peer names"),
            ("seed=zz:1", "invalid peer name"),
            ("observer=3", "no parameter"),
            ("vote", "unknown mode: vote"),
        ] {
            let msg = parse_init(Some(bad), 0).expect_err(bad).to_string();
            assert!(msg.starts_with("Unable to parse --ipalloc-init: "), "{msg}");
            assert!(msg.contains(needle), "{bad}: {msg}");
        }
    }

    #[test]
    fn settings_tie_the_flags_together() {
        let s = settings(DEFAULT_RANGE, None, None, 2)
            .expect("valid")
            .expect("enabled");
        assert_eq!(s.range, cidr("10.32.0.0/12"));
        assert_eq!(s.default_subnet, s.range);
        assert_eq!(s.init, InitSpec::Consensus { quorum: 2 });
        let s = settings("10.32.0.0/12", Some("10.40.0.0/16"), Some("observer"), 0)
            .expect("valid")
            .expect("enabled");
        assert_eq!(s.default_subnet, cidr("10.40.0.0/16"));
        // A default subnet wider than the range still overlaps it.
        assert!(settings("10.32.0.0/12", Some("10.0.0.0/8"), None, 0).is_ok());
        assert_eq!(
            settings("10.32.0.0/12", Some("10.48.0.0/16"), None, 0),
            Err(IpamConfigError::DefaultSubnetOutside {
                subnet: cidr("10.48.0.0/16"),
                range: cidr("10.32.0.0/12")
            })
        );
        assert_eq!(settings("", None, None, 3), Ok(None));
        assert_eq!(
            settings("", Some("10.40.0.0/16"), None, 0),
            Err(IpamConfigError::NeedsRange("ipalloc-default-subnet"))
        );
        assert_eq!(
            settings("", None, Some("observer"), 0),
            Err(IpamConfigError::NeedsRange("ipalloc-init"))
        );
        assert!(settings("10.32.0.0/12", None, Some("bogus"), 0).is_err());
    }

    #[test]
    fn request_timeouts() {
        assert_eq!(
            request_timeout_from(Some("3")),
            Some(Duration::from_secs(3))
        );
        assert_eq!(request_timeout_from(Some("0")), None);
        assert_eq!(request_timeout_from(Some("x")), None);
        assert_eq!(request_timeout_from(None), None);
    }

    #[test]
    fn host_routes_that_overlap() {
        let text =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth0\t00000000\t0102000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
            eth0\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
            docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
            weave\t0000200A\t00000000\t0001\t0\t0\t0\t0000F0FF\t0\t0\t0\n\
            eth1\t0000280A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n";
        let routes = parse_proc_net_route(text);
        assert_eq!(routes.len(), 5);
        assert_eq!(routes[1].dest, cidr("10.0.2.0/24"));
        assert_eq!(routes[2].dest, cidr("172.17.0.0/16"));
        assert_eq!(routes[4].dest, cidr("10.40.0.0/16"));
        let range = cidr("10.32.0.0/12");
        // The default route and the weave bridge's own route do not count.
        let found = overlapping_route(&range, &routes, "weave").expect("eth1 overlaps");
        assert_eq!(found.iface, "eth1");
        assert_eq!(
            overlapping_route(&cidr("172.30.0.0/16"), &routes, "weave"),
            None
        );
        assert!(overlapping_route(&cidr("172.16.0.0/12"), &routes, "weave").is_some());
        assert!(overlaps(&cidr("10.0.0.0/8"), &cidr("10.32.0.0/12")));
        assert!(!overlaps(&cidr("10.48.0.0/12"), &cidr("10.32.0.0/12")));
    }
}
