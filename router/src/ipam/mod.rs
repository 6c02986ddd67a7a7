//! IP address management across the mesh (spec §1), as a pure core: no IO, no clock reads
//! (`now` is passed in), the RNG injected. The router's IPAM actor feeds an [`Allocator`] the
//! HTTP requests, Docker events and mesh events, and carries out its [`Output`]s: replies, sends
//! on the [`IPAM_CHANNEL`], and state to persist.
//!
//! - [`ring`]: the CRDT of who owns which range (tokens, owners, versions, free counts).
//! - [`space`]: the addresses this peer owns and which are free.
//! - [`paxos`]: agreeing on the peers to create the ring for.
//! - [`codec`]: the messages on the wire.
//! - [`allocator`]: requests, pending queues, donation, claims, leave/rmpeer, status.
//! - [`app`]: the allocator as a [`crate::mesh::app::App`], for the simulated network.

pub mod allocator;
pub mod app;
pub mod codec;
pub mod paxos;
#[cfg(test)]
mod proptests;
pub mod ring;
#[cfg(test)]
mod simtests;
pub mod space;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use allocator::Allocator;
pub use app::IpamApp;
pub use ring::RingError;

use crate::addr::Ipv4Cidr;
use crate::mesh::app::AppSend;
use crate::mesh::peer::PeerName;

/// The gossip channel IPAM owns.
pub const IPAM_CHANNEL: &str = "IPallocation";

/// How a peer without a ring gets one (spec §1.1, §1.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitMode {
    /// Paxos among the electors once an address is first needed.
    Consensus { quorum: usize },
    /// Create the ring now from these peers.
    Seed(Vec<PeerName>),
    /// Never vote; learn the ring from others.
    Observer,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `--ipalloc-range`.
    pub universe: Ipv4Cidr,
    /// `--ipalloc-default-subnet` (the universe unless given).
    pub default_subnet: Ipv4Cidr,
    pub init: InitMode,
    /// How long a request may wait (for consensus, for space, for a claim's owner) before it
    /// fails with the reason.
    pub request_timeout: Duration,
}

/// The caller's handle on a request, echoed in its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// An address and the prefix length of its subnet.
    Addr(Ipv4Cidr),
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Reply {
        id: RequestId,
        result: Result<Reply, IpamError>,
    },
    Send(AppSend),
    /// Save this (replaces what was saved before).
    Persist(Persisted),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    /// The caller went away or the container is not alive.
    #[error("cancelled")]
    Cancelled,
    /// The request waited `request_timeout`; `reason` says for what.
    #[error("{reason} (gave up after {}s)", waited.as_secs())]
    Timeout { waited: Duration, reason: String },
    #[error("range {subnet} out of bounds: {universe}")]
    OutOfBounds {
        subnet: Ipv4Cidr,
        universe: Ipv4Cidr,
    },
    #[error("Free: address {addr} not found for {ident}")]
    FreeNotFound { addr: Ipv4Addr, ident: String },
    #[error("Delete: no addresses for {ident}")]
    DeleteNothing { ident: String },
    #[error("address {addr} already in use by {ident}")]
    InUseBy { addr: Ipv4Addr, ident: String },
    #[error("address {addr} already in use")]
    InUse { addr: Ipv4Addr },
    #[error("address {addr} is already owned by {ident}")]
    OwnedBy { addr: Ipv4Addr, ident: String },
    #[error("address {addr} is owned by other peer {peer}")]
    OwnedByOtherPeer {
        addr: Ipv4Addr,
        /// `name(nickname)`.
        peer: String,
    },
    #[error("address {addr} is owned by other peer {peer}, which cannot be reached ({tries} tries); use 'weave rmpeer' if it is dead")]
    OwnerUnreachable {
        addr: Ipv4Addr,
        peer: String,
        tries: u32,
    },
    #[error(
        "IP allocation was seeded by different peers (received: [{received}], ours: [{ours}])"
    )]
    DifferentSeeds { received: String, ours: String },
    #[error(transparent)]
    Ring(RingError),
    #[error("bad IPAM message from {from}: {why}")]
    Decode { from: PeerName, why: String },
    #[error("invalid peer name or nickname {0:?}")]
    UnknownPeer(String),
    #[error("this peer does not take part in IP allocation any more (it left)")]
    Left,
}

/// What survives a restart (spec §1.6): self-describing, so a peer-name or range change is
/// detected and the data discarded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Persisted {
    /// Format of this struct.
    pub version: u32,
    pub peer_name: String,
    /// The universe, as CIDR text.
    pub range: String,
    pub ring: PersistedRing,
    /// ident → its addresses. Shared with the allocator, so handing it out is O(1); the
    /// allocator copies it on its next change if this is still alive then (drop it once saved).
    pub owned: std::sync::Arc<BTreeMap<String, PersistedOwned>>,
    /// Peers' nicknames (for `rmpeer` by nickname after they left).
    #[serde(default)]
    pub nicknames: BTreeMap<String, String>,
}

pub const PERSISTED_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedRing {
    pub entries: Vec<PersistedEntry>,
    pub seeds: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedEntry {
    pub token: Ipv4Addr,
    pub peer: String,
    pub version: u32,
    pub free: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedOwned {
    pub is_container: bool,
    /// `a.b.c.d/len`.
    pub cidrs: Vec<String>,
}

/// `weave status ipam` / the report's `IPAM` key (spec §1.11), Weave's JSON field names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct IpamStatus {
    /// The `Status:` line: `idle`, `awaiting consensus (quorum: Q, known: K)`, `priming`,
    /// `ready`, `waiting for IP(s) to become available`, or the unreachable-owners text.
    pub status: String,
    pub paxos: Option<PaxosStatus>,
    pub range: String,
    #[serde(rename = "RangeNumIPs")]
    pub range_num_ips: u64,
    #[serde(rename = "ActiveIPs")]
    pub active_ips: u64,
    pub default_subnet: String,
    pub entries: Vec<EntryStatus>,
    pub pending_claims: Vec<ClaimStatus>,
    pub pending_allocates: Vec<String>,
}

impl IpamStatus {
    /// `weave status ipam` (spec §1.11): one line per peer owning addresses, `me` (our peer
    /// name) first, then by name; empty when there is no ring.
    pub fn peer_lines(&self, me: &str) -> Vec<String> {
        let mut per_peer: BTreeMap<&str, (u64, &str, bool)> = BTreeMap::new();
        for e in &self.entries {
            let p = per_peer.entry(e.peer.as_str()).or_insert((
                0,
                e.nickname.as_str(),
                e.is_known_peer,
            ));
            p.0 += e.size;
        }
        let mut peers: Vec<(&str, (u64, &str, bool))> = per_peer.into_iter().collect();
        peers.sort_by_key(|(name, _)| *name != me);
        peers
            .into_iter()
            .map(|(name, (ips, nick, known))| {
                let label = if nick.is_empty() {
                    name.to_string()
                } else {
                    format!("{name}({nick})")
                };
                let pct = if self.range_num_ips == 0 {
                    0.0
                } else {
                    ips as f64 * 100.0 / self.range_num_ips as f64
                };
                let info = if name == me {
                    format!("({} active)", self.active_ips)
                } else if !known {
                    "- unreachable!".to_string()
                } else {
                    String::new()
                };
                format!("{label:<37} {ips:>8} IPs ({pct:04.1}% of total) {info}")
                    .trim_end()
                    .to_string()
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct PaxosStatus {
    pub elector: bool,
    pub known_nodes: usize,
    pub quorum: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct EntryStatus {
    pub token: String,
    pub size: u64,
    pub peer: String,
    pub nickname: String,
    /// Reachable through the mesh now (us included).
    pub is_known_peer: bool,
    pub version: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClaimStatus {
    #[serde(rename = "Ident")]
    pub ident: String,
    #[serde(rename = "CIDR")]
    pub cidr: String,
}

/// The status line for "all ranges belong to peers we cannot reach".
pub const STATUS_UNREACHABLE: &str =
    "all IP ranges owned by unreachable peers - use 'rmpeer' if they are dead";
