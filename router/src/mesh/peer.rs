//! Peer identity (spec §1.2–1.3): the 48-bit peer name shown like a MAC address, the per-process
//! UID that detects restarts, and the nickname shown next to the name.

use std::fmt;
use std::str::FromStr;

/// A 48-bit peer name, shown like a MAC (`7e:21:4a:70:2f:45`). Ordered numerically (first byte
/// most significant), which is what the deterministic route computation relies on.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PeerName(u64);

/// Longest nickname we send or accept (bytes of UTF-8).
pub const MAX_NICKNAME_LEN: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid peer name {0:?}: expected six hex bytes like 7e:21:4a:70:2f:45 (:: abbreviations allowed)")]
pub struct PeerNameError(pub String);

impl PeerName {
    /// The "unknown" sentinel `00:00:00:00:00:00`.
    pub const UNKNOWN: PeerName = PeerName(0);
    const MASK: u64 = 0xffff_ffff_ffff;

    /// The name from its numeric value; bits above 48 are dropped.
    pub const fn from_u64(v: u64) -> Self {
        PeerName(v & Self::MASK)
    }

    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// Wire form: 6 bytes, most significant first.
    pub fn from_bytes(b: [u8; 6]) -> Self {
        let mut v = 0u64;
        for byte in b {
            v = (v << 8) | u64::from(byte);
        }
        PeerName(v)
    }

    pub fn to_bytes(self) -> [u8; 6] {
        let be = self.0.to_be_bytes();
        [be[2], be[3], be[4], be[5], be[6], be[7]]
    }
}

impl fmt::Display for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.to_bytes();
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn parse_groups(s: &str) -> Option<Vec<u8>> {
    if s.is_empty() {
        return Some(Vec::new());
    }
    s.split(':')
        .map(|g| {
            if g.is_empty() || g.len() > 2 {
                None
            } else {
                u8::from_str_radix(g, 16).ok()
            }
        })
        .collect()
}

impl FromStr for PeerName {
    type Err = PeerNameError;

    /// Accepts `7e:21:4a:70:2f:45` and `::`-abbreviated forms (`::1`, `ab::`, `1::2`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || PeerNameError(s.to_string());
        let bytes: Vec<u8> = match s.split_once("::") {
            None => parse_groups(s).ok_or_else(err)?,
            Some((head, tail)) => {
                if tail.contains("::") {
                    return Err(err());
                }
                let h = parse_groups(head).ok_or_else(err)?;
                let t = parse_groups(tail).ok_or_else(err)?;
                if h.len() + t.len() > 5 {
                    return Err(err());
                }
                let mut v = h;
                v.resize(6 - t.len(), 0);
                v.extend(t);
                v
            }
        };
        let arr: [u8; 6] = bytes.try_into().map_err(|_| err())?;
        Ok(PeerName::from_bytes(arr))
    }
}

/// Random non-zero u64 chosen at every process start (0 is reserved for placeholder peers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PeerUid(pub u64);

impl fmt::Display for PeerUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A peer as the mesh knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: PeerName,
    pub nickname: String,
    pub uid: PeerUid,
    /// Topology version (bumped by the peer itself on every change of its connections).
    pub version: u64,
}

impl fmt::Display for Peer {
    /// `name(nickname)`, as everywhere in Weave's logs and status.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name, self.nickname)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parse_forms() {
        let n: PeerName = "7e:21:4a:70:2f:45".parse().unwrap();
        assert_eq!(n.as_u64(), 0x7e21_4a70_2f45);
        assert_eq!(n.to_string(), "7e:21:4a:70:2f:45");
        assert_eq!("::1".parse::<PeerName>().unwrap().as_u64(), 1);
        assert_eq!(
            "ab::".parse::<PeerName>().unwrap().to_string(),
            "ab:00:00:00:00:00"
        );
        assert_eq!(
            "1::2".parse::<PeerName>().unwrap().to_string(),
            "01:00:00:00:00:02"
        );
        assert_eq!("::".parse::<PeerName>().unwrap(), PeerName::UNKNOWN);
        for bad in [
            "",
            "1:2:3",
            "1:2:3:4:5:6:7",
            "xx::",
            "1::2::3",
            "123::",
            "1:2:3:4:5:6::",
            ":1:2:3:4:5:6",
        ] {
            assert!(bad.parse::<PeerName>().is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn display_parse_round_trip(v in 0u64..(1 << 48)) {
            let n = PeerName::from_u64(v);
            prop_assert_eq!(n.to_string().parse::<PeerName>().unwrap(), n);
            prop_assert_eq!(PeerName::from_bytes(n.to_bytes()), n);
        }

        #[test]
        fn parse_never_panics(s in ".{0,40}") {
            let _ = s.parse::<PeerName>();
        }
    }
}
