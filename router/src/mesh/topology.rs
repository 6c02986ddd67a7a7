//! The mesh topology (spec §3.2, §3.5): every peer's versioned list of connections, its wire
//! encoding (bounded decode, never panics), the merge rules and peer garbage collection.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::gossip::GossipData;
use super::peer::{Peer, PeerName, PeerUid};
use super::wire::{put_short_str, Reader};

/// Decode limits: a payload claiming more is rejected before allocation.
pub const MAX_PEERS: usize = 10_000;
pub const MAX_CONNS_PER_PEER: usize = 10_000;

/// One connection as reported by the peer that owns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnSummary {
    pub remote: PeerName,
    /// Remote TCP address as seen by the owner (`ip:port`).
    pub addr: String,
    /// The owner dialled it.
    pub outbound: bool,
    pub established: bool,
}

/// A peer's entry: identity plus its own connection list, versioned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerEntry {
    pub name: PeerName,
    pub nickname: String,
    /// 0 = placeholder (only referenced in someone's connection list).
    pub uid: PeerUid,
    pub version: u64,
    pub short_id: Option<u16>,
    /// Sorted by remote name, one per remote.
    pub conns: Vec<ConnSummary>,
}

impl PeerEntry {
    fn placeholder(name: PeerName) -> Self {
        PeerEntry {
            name,
            nickname: String::new(),
            uid: PeerUid(0),
            version: 0,
            short_id: None,
            conns: Vec::new(),
        }
    }

    pub fn peer(&self) -> Peer {
        Peer {
            name: self.name,
            nickname: self.nickname.clone(),
            uid: self.uid,
            version: self.version,
        }
    }

    /// Merge rule (spec §3.2): is `other` newer than `self`?
    fn superseded_by(&self, other: &PeerEntry) -> bool {
        (other.version, other.uid.0, other.short_id.is_some())
            > (self.version, self.uid.0, self.short_id.is_some())
    }

    pub fn conn_to(&self, remote: PeerName) -> Option<&ConnSummary> {
        self.conns
            .binary_search_by_key(&remote, |c| c.remote)
            .ok()
            .and_then(|i| self.conns.get(i))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    #[error("malformed topology payload: {0}")]
    Malformed(&'static str),
}

/// The whole graph as this peer knows it.
#[derive(Debug, Clone)]
pub struct Topology {
    me: PeerName,
    peers: BTreeMap<PeerName, PeerEntry>,
    /// Peers changed since the last [`take_changes`](Self::take_changes).
    changes: BTreeSet<PeerName>,
    /// Peers to gossip on the next on-change round.
    pending: BTreeSet<PeerName>,
}

impl Topology {
    pub fn new(me: &Peer) -> Self {
        let mut peers = BTreeMap::new();
        peers.insert(
            me.name,
            PeerEntry {
                name: me.name,
                nickname: me.nickname.clone(),
                uid: me.uid,
                version: me.version,
                short_id: None,
                conns: Vec::new(),
            },
        );
        Topology {
            me: me.name,
            peers,
            changes: BTreeSet::new(),
            pending: BTreeSet::new(),
        }
    }

    pub fn me(&self) -> PeerName {
        self.me
    }

    pub fn get(&self, name: PeerName) -> Option<&PeerEntry> {
        self.peers.get(&name)
    }

    pub fn local(&self) -> Option<&PeerEntry> {
        self.peers.get(&self.me)
    }

    pub fn peers(&self) -> impl Iterator<Item = &PeerEntry> {
        self.peers.values()
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Peers changed (merged, added, updated locally) since the last call: nudge the
    /// ConnectionMaker and recompute routes when non-empty.
    pub fn take_changes(&mut self) -> BTreeSet<PeerName> {
        std::mem::take(&mut self.changes)
    }

    fn touch_local(&mut self) {
        if let Some(me) = self.peers.get_mut(&self.me) {
            me.version += 1;
        }
        self.changes.insert(self.me);
        self.pending.insert(self.me);
    }

    /// Add (or replace) our connection to `conn.remote`; bumps our version.
    pub fn add_local_conn(&mut self, conn: ConnSummary) {
        let remote = conn.remote;
        if let Some(me) = self.peers.get_mut(&self.me) {
            match me.conns.binary_search_by_key(&remote, |c| c.remote) {
                Ok(i) => {
                    if let Some(slot) = me.conns.get_mut(i) {
                        *slot = conn;
                    }
                }
                Err(i) => me.conns.insert(i, conn),
            }
        }
        self.peers
            .entry(remote)
            .or_insert_with(|| PeerEntry::placeholder(remote));
        self.pending.insert(remote);
        self.touch_local();
    }

    /// Mark our connection to `remote` established; bumps our version. False if unknown.
    pub fn set_local_established(&mut self, remote: PeerName) -> bool {
        let Some(c) = self
            .peers
            .get_mut(&self.me)
            .and_then(|me| me.conns.iter_mut().find(|c| c.remote == remote))
        else {
            return false;
        };
        c.established = true;
        self.touch_local();
        true
    }

    /// Drop our connection to `remote`; bumps our version. False if there was none.
    pub fn remove_local_conn(&mut self, remote: PeerName) -> bool {
        let Some(me) = self.peers.get_mut(&self.me) else {
            return false;
        };
        let before = me.conns.len();
        me.conns.retain(|c| c.remote != remote);
        if me.conns.len() == before {
            return false;
        }
        self.touch_local();
        true
    }

    /// Set our ShortID; bumps our version.
    pub fn set_local_short_id(&mut self, id: u16) {
        if let Some(me) = self.peers.get_mut(&self.me) {
            me.short_id = Some(id & 0xfff);
        }
        self.touch_local();
    }

    /// Merge decoded entries (spec §3.2). Returns the peers that changed.
    pub fn merge(&mut self, update: Vec<PeerEntry>) -> BTreeSet<PeerName> {
        let mut changed = BTreeSet::new();
        for mut entry in update {
            if entry.name == self.me {
                let (my_uid, my_version) = match self.peers.get(&self.me) {
                    Some(me) => (me.uid, me.version),
                    None => continue,
                };
                if entry.uid != my_uid && entry.version >= my_version {
                    // A stale incarnation of us is still gossiped: outrun it and re-announce.
                    if let Some(me) = self.peers.get_mut(&self.me) {
                        me.version = entry.version.saturating_add(1);
                    }
                    changed.insert(self.me);
                    self.pending.insert(self.me);
                }
                continue;
            }
            entry.conns.sort_by_key(|c| c.remote);
            entry.conns.dedup_by_key(|c| c.remote);
            for c in &entry.conns {
                self.peers
                    .entry(c.remote)
                    .or_insert_with(|| PeerEntry::placeholder(c.remote));
            }
            let newer = match self.peers.get(&entry.name) {
                None => true,
                Some(old) => old.superseded_by(&entry),
            };
            if newer {
                changed.insert(entry.name);
                self.peers.insert(entry.name, entry);
            }
        }
        self.changes.extend(changed.iter().copied());
        changed
    }

    /// Remove peers not reachable from us over any reported connection (either direction) and
    /// not in `keep` (peers of live local connections). Returns the removed peers.
    pub fn gc(&mut self, keep: &BTreeSet<PeerName>) -> Vec<Peer> {
        let mut adj: BTreeMap<PeerName, BTreeSet<PeerName>> = BTreeMap::new();
        for p in self.peers.values() {
            for c in &p.conns {
                adj.entry(p.name).or_default().insert(c.remote);
                adj.entry(c.remote).or_default().insert(p.name);
            }
        }
        let mut seen = BTreeSet::from([self.me]);
        let mut queue = VecDeque::from([self.me]);
        while let Some(n) = queue.pop_front() {
            for &m in adj.get(&n).into_iter().flatten() {
                if seen.insert(m) {
                    queue.push_back(m);
                }
            }
        }
        let gone: Vec<PeerName> = self
            .peers
            .keys()
            .filter(|n| !seen.contains(n) && !keep.contains(n))
            .copied()
            .collect();
        gone.iter()
            .filter_map(|n| {
                self.pending.remove(n);
                self.peers.remove(n).map(|e| e.peer())
            })
            .collect()
    }

    /// Encode the given peers (all when `only` is `None`). Placeholders are never sent.
    pub fn encode(&self, only: Option<&BTreeSet<PeerName>>) -> Vec<u8> {
        let entries: Vec<&PeerEntry> = self
            .peers
            .values()
            .filter(|p| p.uid.0 != 0 && only.is_none_or(|s| s.contains(&p.name)))
            .collect();
        let mut b = Vec::new();
        b.extend_from_slice(&(entries.len() as u32).to_be_bytes());
        for p in entries {
            b.extend_from_slice(&p.name.to_bytes());
            put_short_str(&mut b, &p.nickname);
            b.extend_from_slice(&p.uid.0.to_be_bytes());
            b.extend_from_slice(&p.version.to_be_bytes());
            match p.short_id {
                Some(id) => {
                    b.push(1);
                    b.extend_from_slice(&id.to_be_bytes());
                }
                None => b.extend_from_slice(&[0, 0, 0]),
            }
            b.extend_from_slice(&(p.conns.len() as u32).to_be_bytes());
            for c in &p.conns {
                b.extend_from_slice(&c.remote.to_bytes());
                put_short_str(&mut b, &c.addr);
                b.push(u8::from(c.outbound) | (u8::from(c.established) << 1));
            }
        }
        b
    }

    /// Decode a payload; every count is checked against what is left before allocating.
    pub fn decode(payload: &[u8]) -> Result<Vec<PeerEntry>, TopologyError> {
        let bad = |_| TopologyError::Malformed("truncated");
        let mut r = Reader::new(payload);
        let n = r.u32().map_err(bad)? as usize;
        // A peer takes at least 6+1+8+8+3+4 bytes.
        if n > MAX_PEERS || n > r.remaining() / 30 {
            return Err(TopologyError::Malformed("too many peers"));
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let name = PeerName::from_bytes(r.array().map_err(bad)?);
            let nickname = r.short_str().map_err(bad)?.to_string();
            let uid = PeerUid(r.u64().map_err(bad)?);
            let version = r.u64().map_err(bad)?;
            let has = r.u8().map_err(bad)?;
            let id = r.u16().map_err(bad)?;
            let short_id = match has {
                0 => None,
                1 => Some(id & 0xfff),
                _ => return Err(TopologyError::Malformed("bad short id flag")),
            };
            let nc = r.u32().map_err(bad)? as usize;
            if nc > MAX_CONNS_PER_PEER || nc > r.remaining() / 8 {
                return Err(TopologyError::Malformed("too many connections"));
            }
            let mut conns = Vec::with_capacity(nc);
            for _ in 0..nc {
                let remote = PeerName::from_bytes(r.array().map_err(bad)?);
                let addr = r.short_str().map_err(bad)?.to_string();
                let flags = r.u8().map_err(bad)?;
                if flags > 3 {
                    return Err(TopologyError::Malformed("bad connection flags"));
                }
                conns.push(ConnSummary {
                    remote,
                    addr,
                    outbound: flags & 1 != 0,
                    established: flags & 2 != 0,
                });
            }
            if uid.0 == 0 {
                return Err(TopologyError::Malformed("zero UID"));
            }
            out.push(PeerEntry {
                name,
                nickname,
                uid,
                version,
                short_id,
                conns,
            });
        }
        if !r.is_empty() {
            return Err(TopologyError::Malformed("trailing bytes"));
        }
        Ok(out)
    }
}

impl GossipData for Topology {
    type Error = TopologyError;

    fn full_state(&self) -> Vec<u8> {
        self.encode(None)
    }

    fn on_gossip(&mut self, payload: &[u8]) -> Result<Option<Vec<u8>>, TopologyError> {
        let update = Self::decode(payload)?;
        let changed = self.merge(update);
        Ok((!changed.is_empty()).then(|| self.encode(Some(&changed))))
    }

    fn take_pending(&mut self) -> Option<Vec<u8>> {
        let pending = std::mem::take(&mut self.pending);
        (!pending.is_empty()).then(|| self.encode(Some(&pending)))
    }

    fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn peer(n: u64) -> Peer {
        Peer {
            name: PeerName::from_u64(n),
            nickname: format!("p{n}"),
            uid: PeerUid(n + 100),
            version: 0,
        }
    }

    pub(crate) fn conn(to: u64, established: bool) -> ConnSummary {
        ConnSummary {
            remote: PeerName::from_u64(to),
            addr: format!("10.0.0.{to}:6783"),
            outbound: true,
            established,
        }
    }

    #[test]
    fn encode_decode_round_trip_and_merge() {
        let mut a = Topology::new(&peer(1));
        a.add_local_conn(conn(2, false));
        a.set_local_established(PeerName::from_u64(2));
        a.set_local_short_id(7);
        assert_eq!(a.local().unwrap().version, 3);
        let bytes = a.encode(None);
        let decoded = Topology::decode(&bytes).unwrap();
        assert_eq!(decoded.len(), 1, "placeholder for 2 not sent");
        assert_eq!(&decoded[0], a.local().unwrap());

        let mut b = Topology::new(&peer(2));
        let relay = b.on_gossip(&bytes).unwrap();
        assert!(relay.is_some());
        assert_eq!(b.get(PeerName::from_u64(1)).unwrap().conns.len(), 1);
        // Same again: nothing new.
        assert_eq!(b.on_gossip(&bytes).unwrap(), None);
        // Older version ignored.
        let mut old = decoded.clone();
        old[0].version = 1;
        old[0].conns.clear();
        assert!(b.merge(old).is_empty());
        // A peer's own entry is only updated by it: gossip about b from a stale incarnation.
        let mut fake = PeerEntry::placeholder(PeerName::from_u64(2));
        fake.uid = PeerUid(5);
        fake.version = 10;
        let changed = b.merge(vec![fake]);
        assert!(changed.contains(&PeerName::from_u64(2)));
        assert_eq!(b.local().unwrap().uid, PeerUid(102));
        assert_eq!(b.local().unwrap().version, 11);
    }

    #[test]
    fn merge_tie_breaks() {
        let mut t = Topology::new(&peer(1));
        let mut e = PeerEntry::placeholder(PeerName::from_u64(2));
        e.uid = PeerUid(5);
        e.version = 3;
        assert_eq!(t.merge(vec![e.clone()]).len(), 1);
        let mut higher_uid = e.clone();
        higher_uid.uid = PeerUid(6);
        assert_eq!(t.merge(vec![higher_uid.clone()]).len(), 1);
        assert!(t.merge(vec![e.clone()]).is_empty());
        let mut with_id = higher_uid.clone();
        with_id.short_id = Some(1);
        assert_eq!(t.merge(vec![with_id]).len(), 1);
    }

    #[test]
    fn gc_removes_unreachable() {
        let mut t = Topology::new(&peer(1));
        t.add_local_conn(conn(2, true));
        let mut p3 = PeerEntry::placeholder(PeerName::from_u64(3));
        p3.uid = PeerUid(3);
        p3.version = 1;
        p3.conns.push(conn(4, true));
        t.merge(vec![p3]);
        assert_eq!(t.len(), 4);
        let removed = t.gc(&BTreeSet::new());
        let names: Vec<_> = removed.iter().map(|p| p.name.as_u64()).collect();
        assert_eq!(names, vec![3, 4]);
        t.remove_local_conn(PeerName::from_u64(2));
        assert!(t.gc(&BTreeSet::from([PeerName::from_u64(2)])).is_empty());
        assert_eq!(t.gc(&BTreeSet::new()).len(), 1);
    }

    #[test]
    fn pending_is_coalesced() {
        let mut t = Topology::new(&peer(1));
        t.add_local_conn(conn(2, false));
        t.set_local_established(PeerName::from_u64(2));
        assert!(t.has_pending());
        let p = t.take_pending().unwrap();
        assert_eq!(Topology::decode(&p).unwrap().len(), 1);
        assert!(t.take_pending().is_none());
    }

    proptest! {
        #[test]
        fn decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Topology::decode(&b);
        }

        #[test]
        fn huge_counts_rejected(n in any::<u32>()) {
            let mut b = n.to_be_bytes().to_vec();
            b.extend_from_slice(&[0; 20]);
            prop_assert!(Topology::decode(&b).is_err() || n == 0);
        }
    }
}
