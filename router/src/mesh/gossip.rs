//! The generic gossip layer (spec §3.1, §3.3, §3.4): a [`GossipChannel`] wraps any
//! [`GossipData`] (topology now, the IPAM ring and DNS later) and decides, as pure functions of
//! `now`, when to send what. The router shell turns [`GossipAction`]s into
//! [`Message`]s to neighbours chosen by [`choose_neighbours`].

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use rand_core::RngCore;
use sha2::{Digest, Sha256};

use super::conn::Message;
use super::peer::PeerName;

/// Full state of every channel goes to random neighbours this often (safety net).
pub const GOSSIP_INTERVAL: Duration = Duration::from_secs(30);
/// Local changes are coalesced for this long before being gossiped.
pub const ON_CHANGE_DELAY: Duration = Duration::from_secs(1);
/// Largest payload of one gossip message on any channel but topology (whose full state grows
/// with the mesh, bounded by the frame size). Larger ones are dropped when decoded.
pub const MAX_GOSSIP_PAYLOAD: usize = 1 << 20;
/// Payload digests the surrogate filter remembers at most (oldest forgotten first): about
/// 100 bytes each.
pub const MAX_SURROGATE_ENTRIES: usize = 16 * 1024;

/// State replicated by gossip. Payloads are opaque bytes to the gossip layer.
pub trait GossipData {
    type Error: std::error::Error;

    /// Everything we know (sent to new/restarted peers and periodically).
    fn full_state(&self) -> Vec<u8>;

    /// Merge a received gossip payload; return the improvement (only what was new to us), to
    /// relay onwards, or `None` if nothing was new.
    fn on_gossip(&mut self, payload: &[u8]) -> Result<Option<Vec<u8>>, Self::Error>;

    /// A broadcast from `src` (relayed along `src`'s tree by the router, whatever this returns).
    fn on_broadcast(&mut self, _src: PeerName, payload: &[u8]) -> Result<(), Self::Error> {
        self.on_gossip(payload).map(|_| ())
    }

    /// A unicast addressed to us.
    fn on_unicast(&mut self, _src: PeerName, _payload: &[u8]) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Local changes to announce (coalesced by the channel), if any.
    fn take_pending(&mut self) -> Option<Vec<u8>> {
        None
    }

    /// Whether [`take_pending`](Self::take_pending) would return something.
    fn has_pending(&self) -> bool {
        false
    }
}

/// What the shell should send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GossipAction {
    /// Send `payload` as gossip on this channel to random neighbours, except `exclude`.
    Gossip {
        payload: Vec<u8>,
        exclude: Option<PeerName>,
    },
}

/// One named channel.
#[derive(Debug)]
pub struct GossipChannel<D> {
    name: String,
    data: D,
    interval: Duration,
    delay: Duration,
    next_periodic: Instant,
    pending_at: Option<Instant>,
}

impl<D: GossipData> GossipChannel<D> {
    pub fn new(name: impl Into<String>, data: D, now: Instant) -> Self {
        Self::with_timing(name, data, now, GOSSIP_INTERVAL, ON_CHANGE_DELAY)
    }

    pub fn with_timing(
        name: impl Into<String>,
        data: D,
        now: Instant,
        interval: Duration,
        delay: Duration,
    ) -> Self {
        GossipChannel {
            name: name.into(),
            data,
            interval,
            delay,
            next_periodic: now + interval,
            pending_at: None,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn data(&self) -> &D {
        &self.data
    }

    /// Mutate the data; call [`notify_changed`](Self::notify_changed) afterwards.
    pub fn data_mut(&mut self) -> &mut D {
        &mut self.data
    }

    /// Local data changed: schedule an on-change gossip (coalesced).
    pub fn notify_changed(&mut self, now: Instant) {
        if self.pending_at.is_none() {
            self.pending_at = Some(now + self.delay);
        }
    }

    /// A gossip message from neighbour `from`. Returns the relay of what was new.
    pub fn on_gossip(
        &mut self,
        now: Instant,
        from: PeerName,
        payload: &[u8],
    ) -> Result<Option<GossipAction>, D::Error> {
        let relay = self.data.on_gossip(payload)?;
        if self.data.has_pending() {
            self.notify_changed(now);
        }
        Ok(relay.map(|payload| GossipAction::Gossip {
            payload,
            exclude: Some(from),
        }))
    }

    pub fn on_broadcast(&mut self, src: PeerName, payload: &[u8]) -> Result<(), D::Error> {
        self.data.on_broadcast(src, payload)
    }

    pub fn on_unicast(&mut self, src: PeerName, payload: &[u8]) -> Result<(), D::Error> {
        self.data.on_unicast(src, payload)
    }

    /// The message carrying our full state (for a new or restarted peer).
    pub fn full_state_message(&self, me: PeerName) -> Message {
        self.message(me, self.data.full_state())
    }

    /// Wrap a payload for this channel.
    pub fn message(&self, me: PeerName, payload: Vec<u8>) -> Message {
        Message::Gossip {
            channel: self.name.clone(),
            src: me,
            payload,
        }
    }

    pub fn poll_timeout(&self) -> Instant {
        match self.pending_at {
            Some(t) => t.min(self.next_periodic),
            None => self.next_periodic,
        }
    }

    /// On-change and periodic gossip that is due.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<GossipAction> {
        let mut out = Vec::new();
        if self.pending_at.is_some_and(|t| now >= t) {
            self.pending_at = None;
            if let Some(payload) = self.data.take_pending() {
                out.push(GossipAction::Gossip {
                    payload,
                    exclude: None,
                });
            }
        }
        if now >= self.next_periodic {
            self.next_periodic = now + self.interval;
            out.push(GossipAction::Gossip {
                payload: self.data.full_state(),
                exclude: None,
            });
        }
        out
    }
}

/// How many neighbours get a gossip: `min(2·log2(known peers), neighbours)` (spec §3.4).
pub fn gossip_fanout(known_peers: usize, neighbours: usize) -> usize {
    let log2 = usize::BITS - known_peers.max(1).leading_zeros() - 1;
    (2 * log2 as usize).min(neighbours)
}

/// Pick `count` distinct neighbours, weighted (a neighbour's weight = how many destinations use it
/// as next hop, at least 1), without replacement, never `exclude`.
pub fn choose_neighbours<R: RngCore>(
    candidates: &[(PeerName, u32)],
    count: usize,
    exclude: Option<PeerName>,
    rng: &mut R,
) -> Vec<PeerName> {
    let mut pool: Vec<(PeerName, u64)> = candidates
        .iter()
        .filter(|(n, _)| Some(*n) != exclude)
        .map(|&(n, w)| (n, u64::from(w.max(1))))
        .collect();
    pool.sort_by_key(|&(n, _)| n);
    pool.dedup_by_key(|(n, _)| *n);
    let mut out = Vec::new();
    while out.len() < count && !pool.is_empty() {
        let total: u64 = pool.iter().map(|&(_, w)| w).sum();
        let mut pick = rng.next_u64() % total;
        let mut idx = pool.len() - 1;
        for (i, &(_, w)) in pool.iter().enumerate() {
            if pick < w {
                idx = i;
                break;
            }
            pick -= w;
        }
        out.push(pool.swap_remove(idx).0);
    }
    out
}

/// What identifies a gossip message for the surrogate filter: its channel and payload.
pub fn gossip_digest(channel: &str, payload: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(channel.as_bytes());
    h.update([0]);
    h.update(payload);
    h.finalize().into()
}

/// For channels this peer does not run (spec §3.1 "surrogate"): relay gossip unless an
/// identical payload was seen within the gossip interval. Digests expire in the order they were
/// recorded, so each message costs O(1) (amortised) besides hashing its payload, and at most
/// [`MAX_SURROGATE_ENTRIES`] are kept.
#[derive(Debug, Default)]
pub struct SurrogateFilter {
    seen: HashSet<[u8; 32]>,
    /// The digests of `seen` with when they were recorded, oldest first.
    order: VecDeque<([u8; 32], Instant)>,
    evicted: u64,
}

impl SurrogateFilter {
    pub fn should_relay(&mut self, now: Instant, channel: &str, payload: &[u8]) -> bool {
        while let Some((key, t)) = self.order.front() {
            if now.saturating_duration_since(*t) < GOSSIP_INTERVAL {
                break;
            }
            self.seen.remove(key);
            self.order.pop_front();
        }
        let key = gossip_digest(channel, payload);
        if self.seen.contains(&key) {
            return false;
        }
        if self.order.len() >= MAX_SURROGATE_ENTRIES {
            if let Some((old, _)) = self.order.pop_front() {
                self.seen.remove(&old);
                self.evicted += 1;
            }
        }
        self.seen.insert(key);
        self.order.push_back((key, now));
        true
    }

    /// Digests remembered now.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Digests forgotten before their time because the filter was full.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::topology::tests::{conn, peer};
    use crate::mesh::topology::Topology;
    use proptest::prelude::*;
    use rand_core::OsRng;

    #[test]
    fn fanout() {
        assert_eq!(gossip_fanout(1, 5), 0);
        assert_eq!(gossip_fanout(2, 5), 2);
        assert_eq!(gossip_fanout(16, 5), 5);
        assert_eq!(gossip_fanout(16, 20), 8);
    }

    #[test]
    fn channel_timing_and_relay() {
        let t0 = Instant::now();
        let mut a = GossipChannel::new("topology", Topology::new(&peer(1)), t0);
        let mut b = GossipChannel::new("topology", Topology::new(&peer(2)), t0);
        assert_eq!(a.poll_timeout(), t0 + GOSSIP_INTERVAL);
        a.data_mut().add_local_conn(conn(2, false));
        a.notify_changed(t0);
        a.data_mut().set_local_established(PeerName::from_u64(2));
        a.notify_changed(t0 + Duration::from_millis(500));
        assert_eq!(a.poll_timeout(), t0 + ON_CHANGE_DELAY);
        assert!(a.handle_timeout(t0 + Duration::from_millis(900)).is_empty());
        let acts = a.handle_timeout(t0 + ON_CHANGE_DELAY);
        assert_eq!(acts.len(), 1);
        let GossipAction::Gossip { payload, exclude } = &acts[0];
        assert_eq!(*exclude, None);
        let relay = b
            .on_gossip(t0, PeerName::from_u64(1), payload)
            .unwrap()
            .unwrap();
        assert!(
            matches!(relay, GossipAction::Gossip { exclude: Some(n), .. } if n == PeerName::from_u64(1))
        );
        assert_eq!(
            b.on_gossip(t0, PeerName::from_u64(1), payload).unwrap(),
            None
        );
        let periodic = a.handle_timeout(t0 + GOSSIP_INTERVAL);
        assert_eq!(periodic.len(), 1);
        assert_eq!(a.poll_timeout(), t0 + 2 * GOSSIP_INTERVAL);
        assert!(matches!(
            a.full_state_message(PeerName::from_u64(1)),
            Message::Gossip { ref channel, .. } if channel == "topology"
        ));
    }

    #[test]
    fn surrogate_dedup() {
        let t0 = Instant::now();
        let mut f = SurrogateFilter::default();
        assert!(f.should_relay(t0, "IPallocation", b"x"));
        assert!(!f.should_relay(t0 + Duration::from_secs(1), "IPallocation", b"x"));
        assert!(f.should_relay(t0, "nameserver", b"x"));
        assert!(f.should_relay(t0 + GOSSIP_INTERVAL, "IPallocation", b"x"));
        assert_eq!(f.len(), 1, "expired digests are gone");
    }

    #[test]
    fn surrogate_is_bounded_oldest_out() {
        let t0 = Instant::now();
        let mut f = SurrogateFilter::default();
        for i in 0..MAX_SURROGATE_ENTRIES + 10 {
            assert!(f.should_relay(t0, "c", &i.to_be_bytes()));
        }
        assert_eq!(f.len(), MAX_SURROGATE_ENTRIES);
        assert_eq!(f.evicted(), 10);
        // The oldest were forgotten, the newest are still deduplicated.
        assert!(f.should_relay(t0, "c", &0usize.to_be_bytes()));
        let newest = MAX_SURROGATE_ENTRIES + 9;
        assert!(!f.should_relay(t0, "c", &newest.to_be_bytes()));
    }

    proptest! {
        #[test]
        fn choose_is_distinct_bounded_and_excludes(
            ws in proptest::collection::vec(0u32..10, 0..12),
            count in 0usize..15,
            ex in 0u64..12,
        ) {
            let cands: Vec<_> = ws.iter().enumerate().map(|(i, &w)| (PeerName::from_u64(i as u64), w)).collect();
            let ex = PeerName::from_u64(ex);
            let got = choose_neighbours(&cands, count, Some(ex), &mut OsRng);
            let eligible = cands.iter().filter(|(n, _)| *n != ex).count();
            prop_assert_eq!(got.len(), count.min(eligible));
            prop_assert!(!got.contains(&ex));
            let set: std::collections::BTreeSet<_> = got.iter().collect();
            prop_assert_eq!(set.len(), got.len());
        }
    }
}
