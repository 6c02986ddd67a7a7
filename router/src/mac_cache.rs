//! MAC → owner cache and the sleeve's per-frame forwarding decisions (spec §4.2–§4.4). Pure:
//! expiry by the `now` passed in; generic over the peer type `P` (a peer name).
//!
//! The shell captures a frame, calls [`decide_captured`], and sends it to the peer it names (or
//! floods it along our broadcast routes); for every frame received from a forwarder it calls
//! [`decide_received`], injects and/or relays as told, using [`flood_targets`] to drop the
//! neighbour the frame came from and its origin from a broadcast next-hop list.
//!
//! The cache holds at most [`MAC_CAPACITY`] entries: a flood of made-up source MACs (from a
//! container, or relayed by a peer) must not grow it without bound. When full, the entry used
//! least recently (learnt or refreshed as a source, or looked up as a destination) goes, and is
//! counted ([`MacCache::evicted`]).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::MacAddr;

/// Entries expire this long after they were last seen (must exceed ARP cache lifetimes).
pub const MAC_EXPIRY: Duration = Duration::from_secs(600);
/// Last-seen is refreshed at most this often.
const REFRESH: Duration = Duration::from_secs(60);
/// Most entries held.
pub const MAC_CAPACITY: usize = 8192;
/// Spanning tree protocol destination: never forwarded.
const STP: [u8; 6] = [0x01, 0x80, 0xc2, 0x00, 0x00, 0x00];

/// Where a MAC lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Owner<P> {
    /// Behind our own bridge.
    Local,
    Peer(P),
}

#[derive(Debug, Clone)]
struct Entry<P> {
    owner: Owner<P>,
    last_seen: Instant,
    /// Position in the use order (key of [`MacCache::order`]).
    used: u64,
}

/// Result of learning a source MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learned<P> {
    New,
    Refreshed,
    /// Forced learning moved the MAC from `from` (log "Discovered remote MAC m at p (was at q)").
    Moved {
        from: Owner<P>,
    },
    /// Non-forced learning refused: the MAC is currently mapped to this remote peer.
    Conflict(P),
    /// Broadcast/multicast source addresses are never learned.
    Ignored,
}

/// The MAC cache.
#[derive(Debug, Clone)]
pub struct MacCache<P> {
    entries: HashMap<MacAddr, Entry<P>>,
    /// Use order: use stamp → MAC, least recently used first.
    order: BTreeMap<u64, MacAddr>,
    next_use: u64,
    expiry: Duration,
    capacity: usize,
    evicted: u64,
}

impl<P> Default for MacCache<P> {
    fn default() -> Self {
        MacCache::with_limits(MAC_EXPIRY, MAC_CAPACITY)
    }
}

impl<P> MacCache<P> {
    /// A cache with this expiry and capacity (at least 1).
    pub fn with_limits(expiry: Duration, capacity: usize) -> Self {
        MacCache {
            entries: HashMap::new(),
            order: BTreeMap::new(),
            next_use: 0,
            expiry,
            capacity: capacity.max(1),
            evicted: 0,
        }
    }

    /// Entries evicted because the cache was full (not counting expiry).
    pub fn evicted(&self) -> u64 {
        self.evicted
    }
}

fn is_group(mac: &MacAddr) -> bool {
    mac.0[0] & 1 != 0
}

impl<P: Copy + Eq> MacCache<P> {
    pub fn new(expiry: Duration) -> Self {
        MacCache::with_limits(expiry, MAC_CAPACITY)
    }

    fn live(&self, now: Instant, mac: &MacAddr) -> Option<&Entry<P>> {
        self.entries
            .get(mac)
            .filter(|e| now.saturating_duration_since(e.last_seen) < self.expiry)
    }

    /// Mark `mac` (present) as just used. Only once a quarter of the capacity in uses has
    /// passed since its last stamp: per frame that would be two tree updates, and an entry that
    /// recent is nowhere near eviction (so the order is LRU within that slack).
    fn touch(&mut self, mac: MacAddr) {
        let stamp = self.next_use;
        let slack = (self.capacity / 4) as u64;
        if let Some(e) = self
            .entries
            .get_mut(&mac)
            .filter(|e| stamp - e.used > slack)
        {
            self.order.remove(&e.used);
            e.used = stamp;
            self.order.insert(stamp, mac);
            self.next_use += 1;
        }
    }

    /// Insert or overwrite `mac`, evicting the least recently used entry when full.
    fn put(&mut self, mac: MacAddr, owner: Owner<P>, last_seen: Instant) {
        if let Some(e) = self.entries.get_mut(&mac) {
            e.owner = owner;
            e.last_seen = last_seen;
            self.touch(mac);
            return;
        }
        while self.entries.len() >= self.capacity {
            let Some((_, victim)) = self.order.pop_first() else {
                break;
            };
            self.entries.remove(&victim);
            self.evicted += 1;
        }
        let used = self.next_use;
        self.next_use += 1;
        self.entries.insert(
            mac,
            Entry {
                owner,
                last_seen,
                used,
            },
        );
        self.order.insert(used, mac);
    }

    /// The owner of `mac`, unless unknown or expired. Counts as a use.
    pub fn lookup(&mut self, now: Instant, mac: &MacAddr) -> Option<Owner<P>> {
        let owner = self.live(now, mac).map(|e| e.owner);
        if owner.is_some() {
            self.touch(*mac);
        }
        owner
    }

    /// Learn `mac` at `owner`. Non-forced (`force = false`, used on capture) refuses to move a
    /// live entry off a remote peer; forced (on receive) always moves it.
    pub fn learn(
        &mut self,
        now: Instant,
        mac: MacAddr,
        owner: Owner<P>,
        force: bool,
    ) -> Learned<P> {
        if is_group(&mac) {
            return Learned::Ignored;
        }
        let current = self.live(now, &mac).map(|e| (e.owner, e.last_seen));
        match current {
            None => {
                self.put(mac, owner, now);
                Learned::New
            }
            Some((o, seen)) if o == owner => {
                let seen = if now.saturating_duration_since(seen) >= REFRESH {
                    now
                } else {
                    seen
                };
                self.put(mac, owner, seen);
                Learned::Refreshed
            }
            Some((Owner::Peer(p), _)) if !force => Learned::Conflict(p),
            Some((from, _)) => {
                self.put(mac, owner, now);
                Learned::Moved { from }
            }
        }
    }

    /// Remove expired entries (run every minute). Returns how many were removed.
    pub fn sweep(&mut self, now: Instant) -> usize {
        let before = self.entries.len();
        let expiry = self.expiry;
        self.entries
            .retain(|_, e| now.saturating_duration_since(e.last_seen) < expiry);
        self.resync_order();
        before - self.entries.len()
    }

    /// Remove every entry of `peer` (peer garbage-collected).
    pub fn forget_peer(&mut self, peer: P) {
        self.entries.retain(|_, e| e.owner != Owner::Peer(peer));
        self.resync_order();
    }

    fn resync_order(&mut self) {
        let entries = &self.entries;
        self.order.retain(|_, mac| entries.contains_key(mac));
    }

    /// Live entries, for the report JSON (`MACs`).
    pub fn entries(&self, now: Instant) -> impl Iterator<Item = (MacAddr, Owner<P>, Instant)> + '_ {
        self.entries
            .iter()
            .filter(move |(_, e)| now.saturating_duration_since(e.last_seen) < self.expiry)
            .map(|(m, e)| (*m, e.owner, e.last_seen))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Destination and source MACs of an Ethernet frame, if it has a full header.
pub fn ethernet_macs(frame: &[u8]) -> Option<(MacAddr, MacAddr)> {
    let (head, _) = frame.split_first_chunk::<14>()?;
    let [d0, d1, d2, d3, d4, d5, s0, s1, s2, s3, s4, s5, ..] = *head;
    Some((
        MacAddr([d0, d1, d2, d3, d4, d5]),
        MacAddr([s0, s1, s2, s3, s4, s5]),
    ))
}

/// Why a captured frame is not sent anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discard {
    /// Shorter than an Ethernet header.
    Malformed,
    /// Source MAC belongs to a remote peer: probably our own injected frame (log an error).
    SourceIsRemote,
    Stp,
    /// Destination is local: the bridge already delivered it.
    LocalDestination,
}

/// What to do with a frame captured on the local bridge (spec §4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureDecision<P> {
    Discard(Discard),
    /// Send toward peer `dst` (next hop from the unicast routes; dst peer field = `dst`).
    Unicast(P),
    /// Unknown, broadcast or multicast destination: one copy to each of our broadcast next hops,
    /// src peer = us, dst peer field = that neighbour.
    Broadcast,
}

/// Decide for a captured frame, learning its source MAC as local (non-forced).
pub fn decide_captured<P: Copy + Eq>(
    cache: &mut MacCache<P>,
    now: Instant,
    frame: &[u8],
) -> CaptureDecision<P> {
    let Some((dst, src)) = ethernet_macs(frame) else {
        return CaptureDecision::Discard(Discard::Malformed);
    };
    if let Learned::Conflict(_) = cache.learn(now, src, Owner::Local, false) {
        return CaptureDecision::Discard(Discard::SourceIsRemote);
    }
    if dst.0 == STP {
        return CaptureDecision::Discard(Discard::Stp);
    }
    match cache.lookup(now, &dst) {
        Some(Owner::Local) => CaptureDecision::Discard(Discard::LocalDestination),
        Some(Owner::Peer(p)) => CaptureDecision::Unicast(p),
        None => CaptureDecision::Broadcast,
    }
}

/// What to do with a frame received from a forwarder (spec §4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiveDecision<P> {
    /// Not for us: relay unchanged toward `dst` (unicast next hop), re-encrypted per hop.
    Relay(P),
    /// Inject into the local bridge; when `flood`, also relay along the broadcast tree of the
    /// original source peer (see [`flood_targets`]).
    Inject { flood: bool, learned: Learned<P> },
    /// Shorter than an Ethernet header.
    Malformed,
}

/// Decide for a received frame with original source `src_peer` and destination `dst_peer`
/// (both already checked to be known peers). Learns the source MAC at `src_peer` (forced).
pub fn decide_received<P: Copy + Eq>(
    cache: &mut MacCache<P>,
    now: Instant,
    me: P,
    src_peer: P,
    dst_peer: P,
    frame: &[u8],
) -> ReceiveDecision<P> {
    if dst_peer != me {
        return ReceiveDecision::Relay(dst_peer);
    }
    let Some((dst, src)) = ethernet_macs(frame) else {
        return ReceiveDecision::Malformed;
    };
    let learned = cache.learn(now, src, Owner::Peer(src_peer), true);
    let flood = cache.lookup(now, &dst) != Some(Owner::Local);
    ReceiveDecision::Inject { flood, learned }
}

/// Broadcast next hops minus the neighbour the frame arrived from and its origin: never send a
/// frame back where it came from.
pub fn flood_targets<'a, P: Copy + Eq + 'a>(
    next_hops: &'a [P],
    origin: P,
    arrived_from: Option<P>,
) -> impl Iterator<Item = P> + 'a {
    next_hops
        .iter()
        .copied()
        .filter(move |p| *p != origin && Some(*p) != arrived_from)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0xa]);
    const B: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0xb]);
    const BCAST: MacAddr = MacAddr([0xff; 6]);

    fn frame(dst: MacAddr, src: MacAddr) -> Vec<u8> {
        let mut f = dst.0.to_vec();
        f.extend_from_slice(&src.0);
        f.extend_from_slice(&[0x08, 0x00, 1, 2, 3]);
        f
    }

    #[test]
    fn learn_and_expire() {
        let t0 = Instant::now();
        let mut c: MacCache<u32> = MacCache::default();
        assert_eq!(c.learn(t0, A, Owner::Local, false), Learned::New);
        assert_eq!(c.learn(t0, BCAST, Owner::Local, false), Learned::Ignored);
        assert_eq!(c.lookup(t0, &A), Some(Owner::Local));
        assert_eq!(c.learn(t0, B, Owner::Peer(7), true), Learned::New);
        assert_eq!(c.learn(t0, B, Owner::Local, false), Learned::Conflict(7));
        assert_eq!(
            c.learn(t0, B, Owner::Peer(8), true),
            Learned::Moved {
                from: Owner::Peer(7)
            }
        );
        let later = t0 + MAC_EXPIRY;
        assert_eq!(c.lookup(later, &A), None);
        assert_eq!(c.sweep(later), 2);
        assert!(c.is_empty());
        c.learn(t0, B, Owner::Peer(8), true);
        c.forget_peer(8);
        assert!(c.is_empty());
    }

    #[test]
    fn refresh_keeps_entry_alive() {
        let t0 = Instant::now();
        let mut c: MacCache<u32> = MacCache::default();
        c.learn(t0, A, Owner::Local, false);
        let t1 = t0 + Duration::from_secs(500);
        assert_eq!(c.learn(t1, A, Owner::Local, false), Learned::Refreshed);
        assert_eq!(
            c.lookup(t0 + Duration::from_secs(900), &A),
            Some(Owner::Local)
        );
        assert_eq!(c.entries(t1).count(), 1);
    }

    fn mac(i: u32) -> MacAddr {
        let [b0, b1, b2, b3] = i.to_be_bytes();
        MacAddr([0x02, 0, b0, b1, b2, b3])
    }

    #[test]
    fn full_cache_evicts_least_recently_used_and_counts() {
        let t = Instant::now();
        let mut c: MacCache<u32> = MacCache::with_limits(MAC_EXPIRY, 3);
        for i in 0..3 {
            c.learn(t, mac(i), Owner::Peer(1), true);
        }
        // 0 used again (as a destination): 1 is now the least recently used.
        assert_eq!(c.lookup(t, &mac(0)), Some(Owner::Peer(1)));
        assert_eq!(c.learn(t, mac(3), Owner::Local, false), Learned::New);
        assert_eq!(c.len(), 3);
        assert_eq!(c.evicted(), 1);
        assert_eq!(c.lookup(t, &mac(1)), None);
        // Refreshing 2 as a source protects it; 0 goes next.
        assert_eq!(c.learn(t, mac(2), Owner::Peer(1), true), Learned::Refreshed);
        c.learn(t, mac(4), Owner::Local, false);
        assert_eq!(c.lookup(t, &mac(0)), None);
        assert!(c.lookup(t, &mac(2)).is_some());
        assert_eq!(c.evicted(), 2);
        // Expiry and forgetting are not evictions, and free room.
        c.forget_peer(1);
        assert_eq!(c.len(), 2);
        c.learn(t, mac(5), Owner::Local, false);
        assert_eq!(c.evicted(), 2);
        assert_eq!(c.order.len(), c.entries.len());
    }

    #[test]
    fn default_cap_holds_under_a_flood() {
        let t = Instant::now();
        let mut c: MacCache<u32> = MacCache::default();
        for i in 0..(MAC_CAPACITY as u32 + 1000) {
            c.learn(t, mac(i), Owner::Peer(9), true);
        }
        assert_eq!(c.len(), MAC_CAPACITY);
        assert_eq!(c.evicted(), 1000);
        assert_eq!(c.order.len(), MAC_CAPACITY);
        // The newest survive.
        assert!(c.lookup(t, &mac(MAC_CAPACITY as u32 + 999)).is_some());
        assert!(c.lookup(t, &mac(999)).is_none());
    }

    #[test]
    fn captured_decisions() {
        let t = Instant::now();
        let mut c: MacCache<u32> = MacCache::default();
        assert_eq!(
            decide_captured(&mut c, t, &[0; 10]),
            CaptureDecision::Discard(Discard::Malformed)
        );
        assert_eq!(
            decide_captured(&mut c, t, &frame(BCAST, A)),
            CaptureDecision::Broadcast
        );
        assert_eq!(
            decide_captured(&mut c, t, &frame(B, A)),
            CaptureDecision::Broadcast
        );
        c.learn(t, B, Owner::Peer(5), true);
        assert_eq!(
            decide_captured(&mut c, t, &frame(B, A)),
            CaptureDecision::Unicast(5)
        );
        assert_eq!(
            decide_captured(&mut c, t, &frame(A, A)),
            CaptureDecision::Discard(Discard::LocalDestination)
        );
        assert_eq!(
            decide_captured(&mut c, t, &frame(A, B)),
            CaptureDecision::Discard(Discard::SourceIsRemote)
        );
        assert_eq!(
            decide_captured(&mut c, t, &frame(MacAddr(STP), A)),
            CaptureDecision::Discard(Discard::Stp)
        );
    }

    #[test]
    fn received_decisions() {
        let t = Instant::now();
        let mut c: MacCache<u32> = MacCache::default();
        let me = 1;
        assert_eq!(
            decide_received(&mut c, t, me, 2, 3, &frame(A, B)),
            ReceiveDecision::Relay(3)
        );
        assert_eq!(
            decide_received(&mut c, t, me, 2, me, &frame(BCAST, B)),
            ReceiveDecision::Inject {
                flood: true,
                learned: Learned::New
            }
        );
        assert_eq!(c.lookup(t, &B), Some(Owner::Peer(2)));
        c.learn(t, A, Owner::Local, false);
        assert_eq!(
            decide_received(&mut c, t, me, 4, me, &frame(A, B)),
            ReceiveDecision::Inject {
                flood: false,
                learned: Learned::Moved {
                    from: Owner::Peer(2)
                }
            }
        );
        assert_eq!(
            decide_received(&mut c, t, me, 4, me, &[1, 2]),
            ReceiveDecision::Malformed
        );
        let hops = [2, 3, 4];
        assert_eq!(
            flood_targets(&hops, 4, Some(2)).collect::<Vec<_>>(),
            vec![3]
        );
    }
}
