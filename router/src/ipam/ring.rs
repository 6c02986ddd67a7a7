//! The ring CRDT (spec §1.2): the universe `[start, end)` cut at tokens, each entry owning the
//! addresses from its token to the next one (the last wraps round to the first). Only the owner
//! edits an entry, bumping its version; merges keep the higher version.

use std::net::Ipv4Addr;

use crate::mesh::peer::PeerName;

/// What `rmpeer` and `weave reset` add to the versions they take over, so the transfer beats
/// the owner's concurrent edits.
pub const TRANSFER_VERSION_BUMP: u32 = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub token: u64,
    pub peer: PeerName,
    pub version: u32,
    /// Unallocated addresses in the entry's range, as its owner last reported (advisory).
    pub free: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ring {
    pub start: u64,
    pub end: u64,
    /// The local peer.
    pub me: PeerName,
    /// Sorted by token.
    pub entries: Vec<Entry>,
    /// The peers the ring was created from (sorted); empty until known.
    pub seeds: Vec<PeerName>,
}

/// Why a ring was refused (spec §1.2 rule 6 texts; `DifferentSeeds` is reworded with nicknames
/// by the allocator).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error(
        "IP allocation was seeded by different peers (received: {received:?}, ours: {ours:?})"
    )]
    DifferentSeeds {
        received: Vec<PeerName>,
        ours: Vec<PeerName>,
    },
    #[error("Incompatible IP allocation ranges (received: {received}, ours: {ours})")]
    DifferentRange { received: String, ours: String },
    #[error("Peer {peer} says it owns the IP range from {token}, which I think I own")]
    EntryInMyRange { peer: PeerName, token: Ipv4Addr },
    #[error(
        "Inconsistent entries for {token}: owned by {ours} but incoming message says {theirs}"
    )]
    InconsistentEntry {
        token: Ipv4Addr,
        ours: PeerName,
        theirs: PeerName,
    },
    #[error(
        "Received update for IP range I own at {token} v{version}: incoming message says owner {peer} v{their_version}"
    )]
    NewerVersion {
        token: Ipv4Addr,
        version: u32,
        peer: PeerName,
        their_version: u32,
    },
    #[error("invalid IP allocation ring: {0}")]
    Invalid(String),
}

/// An address position as an IPv4 address (positions are < 2^32 except `end`).
pub fn ip(a: u64) -> Ipv4Addr {
    Ipv4Addr::from(a as u32)
}

impl Ring {
    pub fn new(start: u64, end: u64, me: PeerName) -> Self {
        Ring {
            start,
            end,
            me,
            entries: Vec::new(),
            seeds: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sorted, unique tokens inside `[start, end)`, each `free` within its range.
    pub fn check_invariants(&self) -> Result<(), RingError> {
        if self.start >= self.end || self.end > 1 << 32 {
            return Err(RingError::Invalid(format!(
                "bad range [{}, {})",
                self.start, self.end
            )));
        }
        for (i, e) in self.entries.iter().enumerate() {
            if e.token < self.start || e.token >= self.end {
                return Err(RingError::Invalid(format!(
                    "token {} outside the range",
                    ip(e.token)
                )));
            }
            if i > 0 && self.entries[i - 1].token >= e.token {
                return Err(RingError::Invalid(format!(
                    "tokens not sorted or duplicated at {}",
                    ip(e.token)
                )));
            }
        }
        // `size_of(i)` reads the next token: only once all tokens are known sorted.
        for (i, e) in self.entries.iter().enumerate() {
            if e.free > self.size_of(i) {
                return Err(RingError::Invalid(format!(
                    "entry {} reports {} free in a range of {}",
                    ip(e.token),
                    e.free,
                    self.size_of(i)
                )));
            }
        }
        Ok(())
    }

    /// The range of entry `i`, as one or two `[s, e)` pieces (the last entry wraps).
    pub fn ranges_of(&self, i: usize) -> Vec<(u64, u64)> {
        let token = self.entries[i].token;
        match self.entries.get(i + 1) {
            Some(next) => vec![(token, next.token)],
            None => {
                let first = self.entries[0].token;
                let mut v = vec![(token, self.end)];
                if first > self.start {
                    v.push((self.start, first));
                }
                v
            }
        }
    }

    pub fn size_of(&self, i: usize) -> u64 {
        self.ranges_of(i).iter().map(|(s, e)| e - s).sum()
    }

    /// Index of the entry owning `a`.
    fn index_of(&self, a: u64) -> Option<usize> {
        if self.entries.is_empty() || a < self.start || a >= self.end {
            return None;
        }
        match self.entries.partition_point(|e| e.token <= a) {
            0 => Some(self.entries.len() - 1), // before the first token: the last entry's wrap
            n => Some(n - 1),
        }
    }

    pub fn owner(&self, a: u64) -> Option<PeerName> {
        self.index_of(a).map(|i| self.entries[i].peer)
    }

    /// The ranges `peer` owns, in address order, adjacent ones joined.
    pub fn owned_by(&self, peer: PeerName) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = (0..self.entries.len())
            .filter(|&i| self.entries[i].peer == peer)
            .flat_map(|i| self.ranges_of(i))
            .collect();
        v.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
        for (s, e) in v {
            match out.last_mut() {
                Some(last) if last.1 == s => last.1 = e,
                _ => out.push((s, e)),
            }
        }
        out
    }

    /// The peers owning entries, each once, sorted.
    pub fn peers(&self) -> Vec<PeerName> {
        let mut v: Vec<PeerName> = self.entries.iter().map(|e| e.peer).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Rule 2: create the ring for `peers` (sorted, de-duplicated), halving the universe
    /// recursively so every share is CIDR aligned. Only on an empty ring.
    pub fn claim_for_peers(&mut self, peers: &[PeerName]) {
        if !self.entries.is_empty() || peers.is_empty() {
            return;
        }
        let mut peers = peers.to_vec();
        peers.sort_unstable();
        peers.dedup();
        let mut entries = Vec::new();
        split(self.start, self.end, &peers, &mut entries);
        self.entries = entries;
        self.seeds = peers;
    }

    /// Rule 3: our own entries' free counts from `free_in(start, end)`; a change bumps the
    /// version. True when something changed.
    pub fn report_free(&mut self, free_in: impl Fn(u64, u64) -> u64) -> bool {
        let mut changed = false;
        for i in 0..self.entries.len() {
            if self.entries[i].peer != self.me {
                continue;
            }
            let free: u64 = self.ranges_of(i).iter().map(|&(s, e)| free_in(s, e)).sum();
            if self.entries[i].free != free {
                self.entries[i].free = free;
                self.entries[i].version = self.entries[i].version.wrapping_add(1);
                changed = true;
            }
        }
        changed
    }

    /// Rule 4: hand `[start, end)` (inside space we own, all free) to `peer`.
    pub fn grant(&mut self, start: u64, end: u64, peer: PeerName) {
        debug_assert!(start < end && start >= self.start && end <= self.end);
        let end_token = if end == self.end { self.start } else { end };
        // A token of ours at `end`, so what follows stays ours.
        if self
            .entries
            .binary_search_by_key(&end_token, |e| e.token)
            .is_err()
        {
            let at = self.entries.partition_point(|e| e.token < end_token);
            self.entries.insert(
                at,
                Entry {
                    token: end_token,
                    peer: self.me,
                    version: 0,
                    free: 0,
                },
            );
        }
        match self.entries.binary_search_by_key(&start, |e| e.token) {
            Ok(i) => {
                let e = &mut self.entries[i];
                e.peer = peer;
                e.version = e.version.wrapping_add(1);
            }
            Err(at) => self.entries.insert(
                at,
                Entry {
                    token: start,
                    peer,
                    version: 0,
                    free: 0,
                },
            ),
        }
        for e in &mut self.entries {
            if e.token > start && e.token < end {
                e.peer = peer;
                e.version = e.version.wrapping_add(1);
            }
        }
        // The granted entries are all free; trim every count to its (maybe shorter) range.
        for i in 0..self.entries.len() {
            let size = self.size_of(i);
            let e = &mut self.entries[i];
            if e.peer == peer && e.token >= start && e.token < end {
                e.free = size;
            }
            e.free = e.free.min(size);
        }
    }

    /// Rule 5: every entry of `from` becomes `to`'s, version + 100. Returns the ranges moved.
    pub fn transfer(&mut self, from: PeerName, to: PeerName) -> Vec<(u64, u64)> {
        let moved = self.owned_by(from);
        for e in &mut self.entries {
            if e.peer == from {
                e.peer = to;
                e.version = e.version.wrapping_add(TRANSFER_VERSION_BUMP);
            }
        }
        moved
    }

    /// Rule 6: merge `theirs` into ours. `allocated(s, e)` says whether we hold allocations in
    /// `[s, e)`. Returns whether our ring changed. On error ours is unchanged.
    pub fn merge(
        &mut self,
        theirs: &Ring,
        allocated: impl Fn(u64, u64) -> bool,
    ) -> Result<bool, RingError> {
        theirs.check_invariants()?;
        if !theirs.seeds.is_empty() && !self.seeds.is_empty() && theirs.seeds != self.seeds {
            return Err(RingError::DifferentSeeds {
                received: theirs.seeds.clone(),
                ours: self.seeds.clone(),
            });
        }
        if theirs.start != self.start || theirs.end != self.end {
            return Err(RingError::DifferentRange {
                received: range_text(theirs.start, theirs.end),
                ours: range_text(self.start, self.end),
            });
        }
        let me = self.me;
        let mine = &self.entries;
        let other = &theirs.entries;
        let mut result: Vec<Entry> = Vec::with_capacity(mine.len().max(other.len()));
        let mut updated = false;
        // The entry whose range the walk is in, when it is one of ours we kept.
        let mut previous: Option<Entry> = None;
        // The end of entry `i` of ours (the next token, or the wrap to our first token).
        let next_token = |i: usize| mine.get(i + 1).map_or(self.end, |e| e.token);
        let (mut i, mut j) = (0, 0);
        while i < mine.len() && j < other.len() {
            let (m, t) = (mine[i], other[j]);
            if m.token < t.token {
                result.push(m);
                previous = Some(m);
                i += 1;
            } else if m.token > t.token {
                // Their token splits the range of the entry before it.
                if let Some(p) = previous {
                    if p.peer == me && t.peer != me && allocated(t.token, m.token) {
                        return Err(RingError::EntryInMyRange {
                            peer: t.peer,
                            token: ip(t.token),
                        });
                    }
                }
                result.push(t);
                updated = true;
                previous = None;
                j += 1;
            } else {
                let range_allocated = || allocated(m.token, next_token(i));
                let keep = if m.version > t.version {
                    m
                } else if m.version == t.version {
                    if m.peer == t.peer {
                        // Only the owner changes counts, bumping the version: equal versions
                        // normally agree. Larger wins so that merges commute.
                        if t.free > m.free {
                            t
                        } else {
                            m
                        }
                    } else if m.peer == me && range_allocated() {
                        return Err(RingError::InconsistentEntry {
                            token: ip(m.token),
                            ours: m.peer,
                            theirs: t.peer,
                        });
                    } else if (t.free, t.peer) > (m.free, m.peer) {
                        // Larger free wins; on a tie the larger name (not "ours"), so that
                        // merges commute.
                        t
                    } else {
                        m
                    }
                } else if m.peer != me {
                    t
                } else if t.peer != me && !range_allocated() {
                    tracing::info!(token = %ip(m.token), owner = %t.peer, "IPAM: ring repair: handing over a range we hold nothing in");
                    t
                } else if t.peer == me {
                    Entry {
                        version: t.version.wrapping_add(1),
                        ..m
                    }
                } else {
                    return Err(RingError::NewerVersion {
                        token: ip(m.token),
                        version: m.version,
                        peer: t.peer,
                        their_version: t.version,
                    });
                };
                if keep != m {
                    updated = true;
                }
                result.push(keep);
                // Like an entry only we have when we kept (or re-versioned) ours.
                previous = (keep.peer == m.peer).then_some(keep);
                i += 1;
                j += 1;
            }
        }
        result.extend_from_slice(&mine[i..]);
        for &t in &other[j..] {
            if let Some(p) = previous {
                if p.peer == me && t.peer != me {
                    return Err(RingError::EntryInMyRange {
                        peer: t.peer,
                        token: ip(t.token),
                    });
                }
            }
            result.push(t);
            updated = true;
            previous = None;
        }
        self.entries = result;
        // Our own counts may not exceed our (maybe now shorter) ranges; others' counts too, so
        // the invariants hold whatever mix the walk produced.
        for k in 0..self.entries.len() {
            let size = self.size_of(k);
            let e = &mut self.entries[k];
            e.free = e.free.min(size);
        }
        if self.seeds.is_empty() && !theirs.seeds.is_empty() {
            self.seeds = theirs.seeds.clone();
            updated = true;
        }
        Ok(updated)
    }
}

fn range_text(start: u64, end: u64) -> String {
    format!("{}-{}", ip(start), ip(end.saturating_sub(1)))
}

fn split(start: u64, end: u64, peers: &[PeerName], out: &mut Vec<Entry>) {
    if peers.len() == 1 || end - start < 2 {
        out.push(Entry {
            token: start,
            peer: peers[0],
            version: 0,
            free: end - start,
        });
        return;
    }
    let mid = start + (end - start) / 2;
    let half = peers.len() / 2;
    split(start, mid, &peers[..half], out);
    split(mid, end, &peers[half..], out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: u64) -> PeerName {
        PeerName::from_u64(n)
    }

    const S: u64 = 0x0a20_0000; // 10.32.0.0/12
    const E: u64 = S + (1 << 20);

    #[test]
    fn creation_splits_cidr_aligned() {
        let mut r = Ring::new(S, E, p(1));
        r.claim_for_peers(&[p(3), p(1), p(2), p(2)]);
        r.check_invariants().unwrap();
        assert_eq!(r.seeds, vec![p(1), p(2), p(3)]);
        let shares: Vec<(u64, PeerName, u64)> = (0..r.entries.len())
            .map(|i| (r.entries[i].token, r.entries[i].peer, r.size_of(i)))
            .collect();
        assert_eq!(
            shares,
            vec![
                (S, p(1), 1 << 19),
                (S + (1 << 19), p(2), 1 << 18),
                (S + (3 << 18), p(3), 1 << 18)
            ]
        );
        assert_eq!(r.owner(E - 1), Some(p(3)));
        assert_eq!(r.owner(S), Some(p(1)));
        assert_eq!(r.owner(E), None);
    }

    #[test]
    fn grant_inserts_tokens_and_keeps_invariants() {
        let mut r = Ring::new(S, E, p(1));
        r.claim_for_peers(&[p(1)]);
        r.grant(S + 256, S + 512, p(2));
        r.check_invariants().unwrap();
        assert_eq!(r.owner(S + 255), Some(p(1)));
        assert_eq!(r.owner(S + 256), Some(p(2)));
        assert_eq!(r.owner(S + 511), Some(p(2)));
        assert_eq!(r.owner(S + 512), Some(p(1)));
        assert_eq!(r.owned_by(p(2)), vec![(S + 256, S + 512)]);
        assert_eq!(r.owned_by(p(1)), vec![(S, S + 256), (S + 512, E)]);
        // A grant up to the end wraps its closing token to the start (already there).
        r.grant(E - 16, E, p(3));
        r.check_invariants().unwrap();
        assert_eq!(r.owned_by(p(3)), vec![(E - 16, E)]);
        assert_eq!(r.entries.len(), 4);
    }

    #[test]
    fn transfer_bumps_by_100() {
        let mut r = Ring::new(S, E, p(1));
        r.claim_for_peers(&[p(1), p(2)]);
        let moved = r.transfer(p(2), p(1));
        assert_eq!(moved, vec![(S + (1 << 19), E)]);
        assert_eq!(r.entries[1].version, 100);
        assert_eq!(r.owned_by(p(1)), vec![(S, E)]);
    }

    #[test]
    fn merge_takes_newer_and_refuses_bad_rings() {
        let mut a = Ring::new(S, E, p(1));
        a.claim_for_peers(&[p(1), p(2)]);
        let mut b = a.clone();
        b.me = p(2);
        b.grant(S + (1 << 19), S + (1 << 19) + 64, p(1));
        assert_eq!(a.merge(&b, |_, _| false), Ok(true));
        assert_eq!(a.entries, b.entries);
        assert_eq!(a.merge(&b, |_, _| false), Ok(false));

        let mut other_seeds = Ring::new(S, E, p(3));
        other_seeds.claim_for_peers(&[p(3)]);
        let err = a.merge(&other_seeds, |_, _| false).unwrap_err();
        assert!(matches!(err, RingError::DifferentSeeds { .. }));

        let mut other_range = Ring::new(S, S + 1024, p(2));
        other_range.claim_for_peers(&[p(1), p(2)]);
        assert_eq!(
            a.merge(&other_range, |_, _| false).unwrap_err().to_string(),
            "Incompatible IP allocation ranges (received: 10.32.0.0-10.32.3.255, ours: 10.32.0.0-10.47.255.255)"
        );

        let mut broken = b.clone();
        broken.entries.swap(0, 1);
        assert!(matches!(
            a.merge(&broken, |_, _| false),
            Err(RingError::Invalid(_))
        ));
    }

    #[test]
    fn merge_refuses_a_split_of_our_allocated_range() {
        let mut a = Ring::new(S, E, p(1));
        a.claim_for_peers(&[p(1), p(2)]);
        let mut b = a.clone();
        b.me = p(2);
        // b pretends to own the top half of a's share.
        b.entries[0].free = 0;
        b.entries.insert(
            1,
            Entry {
                token: S + (1 << 18),
                peer: p(2),
                version: 0,
                free: 0,
            },
        );
        let err = a.merge(&b, |_, _| true).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Peer 00:00:00:00:00:02 says it owns the IP range from 10.36.0.0, which I think I own"
        );
        // Nothing allocated there: accepted.
        assert_eq!(a.merge(&b, |_, _| false), Ok(true));
    }

    #[test]
    fn merge_of_newer_entry_of_ours() {
        let mut a = Ring::new(S, E, p(1));
        a.claim_for_peers(&[p(1), p(2)]);
        let mut b = a.clone();
        b.entries[0].peer = p(2);
        b.entries[0].version = 5;
        let err = a.clone().merge(&b, |_, _| true).unwrap_err();
        assert!(matches!(err, RingError::NewerVersion { .. }), "{err}");
        // Repair when we hold nothing there.
        let mut c = a.clone();
        assert_eq!(c.merge(&b, |_, _| false), Ok(true));
        assert_eq!(c.owner(S), Some(p(2)));
        // Theirs names us with a higher version: ours kept, version above theirs.
        let mut d = a.clone();
        b.entries[0].peer = p(1);
        assert_eq!(d.merge(&b, |_, _| true), Ok(true));
        assert_eq!(d.entries[0].version, 6);
    }
}
