//! The allocator alone and in small clusters wired by hand (a message list delivered in an
//! order the test picks). Property tests over random interleavings are in `proptests`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::allocator::DEAD_GRACE;
use super::ring::Ring;
use super::*;
use crate::mesh::app::{AppEvent, AppSend, GossipKind, PeerInfo};

pub(crate) struct TestRng(pub u64);

impl rand_core::RngCore for TestRng {
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }
    fn next_u64(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for b in dest {
            *b = self.next_u32() as u8;
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

pub(crate) fn cidr(s: &str) -> Ipv4Cidr {
    s.parse().unwrap()
}

pub(crate) fn peer(n: u64) -> PeerName {
    PeerName::from_u64(n)
}

pub(crate) fn config(universe: &str, init: InitMode) -> Config {
    Config {
        universe: cidr(universe),
        default_subnet: cidr(universe),
        init,
        request_timeout: Duration::from_secs(30),
    }
}

pub(crate) fn new_alloc(
    n: u64,
    cfg: Config,
    persisted: Option<Persisted>,
    now: Instant,
) -> Allocator {
    Allocator::new(
        cfg,
        peer(n),
        format!("host{n}"),
        n * 1000 + 7,
        persisted,
        Box::new(TestRng(n)),
        now,
    )
}

/// Outputs split by kind.
#[derive(Default, Debug)]
pub(crate) struct Out {
    pub replies: Vec<(RequestId, Result<Reply, IpamError>)>,
    pub sends: Vec<AppSend>,
    pub persisted: Option<Persisted>,
}

pub(crate) fn drain(a: &mut Allocator) -> Out {
    let mut o = Out::default();
    while let Some(x) = a.poll_output() {
        match x {
            Output::Reply { id, result } => o.replies.push((id, result)),
            Output::Send(s) => o.sends.push(s),
            Output::Persist(p) => o.persisted = Some(p),
        }
    }
    o
}

fn reply_of(o: &Out, id: u64) -> Option<Result<Reply, IpamError>> {
    o.replies
        .iter()
        .find(|(i, _)| *i == RequestId(id))
        .map(|(_, r)| r.clone())
}

fn addr_of(o: &Out, id: u64) -> Ipv4Cidr {
    match reply_of(o, id) {
        Some(Ok(Reply::Addr(c))) => c,
        other => panic!("request {id}: {other:?}"),
    }
}

#[test]
fn seed_of_one_allocates_lowest_and_is_idempotent() {
    let t0 = Instant::now();
    let mut a = new_alloc(
        1,
        config("10.32.0.0/12", InitMode::Seed(vec![peer(1)])),
        None,
        t0,
    );
    let o = drain(&mut a);
    assert!(o.persisted.is_some(), "the new ring is persisted");
    a.allocate(t0, RequestId(1), "c1", None);
    a.allocate(t0, RequestId(2), "c1", None);
    a.allocate(t0, RequestId(3), "c2", None);
    a.allocate(t0, RequestId(4), "c3", Some(cidr("10.40.7.0/24")));
    let o = drain(&mut a);
    assert_eq!(addr_of(&o, 1), cidr("10.32.0.1/12"));
    assert_eq!(addr_of(&o, 2), cidr("10.32.0.1/12"));
    assert_eq!(addr_of(&o, 3), cidr("10.32.0.2/12"));
    assert_eq!(addr_of(&o, 4), cidr("10.40.7.1/24"));
    assert_eq!(a.lookup("c1", None), vec![cidr("10.32.0.1/12")]);
    assert_eq!(
        a.lookup("c3", Some(cidr("10.40.7.0/24"))),
        vec![cidr("10.40.7.1/24")]
    );
    assert_eq!(a.lookup("c2", Some(cidr("10.40.7.0/24"))), vec![]);
    assert_eq!(a.status().active_ips, 3);
    assert_eq!(a.status().status, "ready");

    a.free(t0, "c1", "10.32.0.1".parse().unwrap()).unwrap();
    assert_eq!(
        a.free(t0, "c1", "10.32.0.1".parse().unwrap())
            .unwrap_err()
            .to_string(),
        "Free: address 10.32.0.1 not found for c1"
    );
    a.allocate(t0, RequestId(5), "c4", None);
    assert_eq!(
        addr_of(&drain(&mut a), 5),
        cidr("10.32.0.1/12"),
        "freed address reused"
    );
    a.delete(t0, "c2").unwrap();
    assert_eq!(
        a.delete(t0, "c2").unwrap_err().to_string(),
        "Delete: no addresses for c2"
    );
    a.check().unwrap();
}

#[test]
fn consensus_of_one_creates_the_ring_on_first_use() {
    let t0 = Instant::now();
    let mut a = new_alloc(
        1,
        config("10.32.0.0/12", InitMode::Consensus { quorum: 1 }),
        None,
        t0,
    );
    assert!(a.ring().is_empty());
    assert_eq!(a.status().status, "idle");
    // Before the first request an elector only gossips its (empty) Paxos claims: no proposal.
    let t = a.poll_timeout().unwrap();
    a.handle_timeout(t);
    let o = drain(&mut a);
    assert!(o
        .sends
        .iter()
        .all(|s| matches!(s, AppSend::Neighbours { .. })));
    assert!(a.ring().is_empty());
    assert_eq!(a.status().status, "idle");
    a.prime(t0, RequestId(1));
    let o = drain(&mut a);
    assert_eq!(reply_of(&o, 1), Some(Ok(Reply::Done)));
    assert!(o.persisted.is_some());
    assert!(
        o.sends
            .iter()
            .any(|s| matches!(s, AppSend::Broadcast { .. })),
        "the ring is broadcast"
    );
    assert_eq!(a.ring().seeds, vec![peer(1)]);
    a.allocate(t0, RequestId(2), "c1", None);
    assert_eq!(addr_of(&drain(&mut a), 2), cidr("10.32.0.1/12"));
}

#[test]
fn out_of_bounds_and_underscore() {
    let t0 = Instant::now();
    let mut a = new_alloc(
        1,
        config("10.32.0.0/12", InitMode::Seed(vec![peer(1)])),
        None,
        t0,
    );
    a.allocate(t0, RequestId(1), "c1", Some(cidr("192.168.0.0/24")));
    let o = drain(&mut a);
    assert_eq!(
        reply_of(&o, 1).unwrap().unwrap_err().to_string(),
        "range 192.168.0.0/24 out of bounds: 10.32.0.0/12"
    );
    a.allocate(t0, RequestId(2), "_", None);
    let c = addr_of(&drain(&mut a), 2);
    assert_eq!(
        a.lookup(&c.addr.to_string(), None),
        vec![c],
        "filed under its address"
    );
}

#[test]
fn claims_inside_our_space() {
    let t0 = Instant::now();
    let mut a = new_alloc(
        1,
        config("10.32.0.0/12", InitMode::Seed(vec![peer(1)])),
        None,
        t0,
    );
    drain(&mut a);
    a.claim(t0, RequestId(1), "c1", cidr("10.32.5.5/12"), false);
    a.claim(t0, RequestId(2), "c1", cidr("10.32.5.5/12"), false);
    a.claim(t0, RequestId(3), "c2", cidr("10.32.5.5/12"), false);
    a.claim(t0, RequestId(4), "_", cidr("10.32.5.5/12"), false);
    let o = drain(&mut a);
    assert_eq!(reply_of(&o, 1), Some(Ok(Reply::Done)));
    assert_eq!(reply_of(&o, 2), Some(Ok(Reply::Done)));
    assert_eq!(
        reply_of(&o, 3).unwrap().unwrap_err().to_string(),
        "address 10.32.5.5 is already owned by c1"
    );
    assert_eq!(reply_of(&o, 4), Some(Ok(Reply::Done)));
    // Anonymous then a real container.
    a.claim(t0, RequestId(5), "_", cidr("10.32.5.6/12"), false);
    a.claim(t0, RequestId(6), "c3", cidr("10.32.5.6/12"), false);
    let o = drain(&mut a);
    assert_eq!(reply_of(&o, 5), Some(Ok(Reply::Done)));
    assert_eq!(
        reply_of(&o, 6).unwrap().unwrap_err().to_string(),
        "address 10.32.5.6 already in use"
    );
    // Claimed addresses are not handed out again.
    a.claim(t0, RequestId(7), "c4", cidr("10.32.0.1/12"), false);
    a.allocate(t0, RequestId(8), "c5", None);
    let o = drain(&mut a);
    assert_eq!(addr_of(&o, 8), cidr("10.32.0.2/12"));
    a.check().unwrap();
}

#[test]
fn claims_outside_the_universe_never_block() {
    let t0 = Instant::now();
    // No ring at all (consensus of 2, alone): outside claims still answer at once.
    let mut a = new_alloc(
        1,
        config("10.32.0.0/12", InitMode::Consensus { quorum: 2 }),
        None,
        t0,
    );
    a.claim(t0, RequestId(1), "c1", cidr("192.168.1.1/24"), false);
    a.claim(t0, RequestId(2), "c2", cidr("192.168.1.1/24"), false);
    a.claim(t0, RequestId(3), "_", cidr("192.168.1.1/24"), false);
    a.claim(t0, RequestId(4), "c1", cidr("192.168.1.1/24"), false);
    let o = drain(&mut a);
    assert_eq!(reply_of(&o, 1), Some(Ok(Reply::Done)));
    assert_eq!(
        reply_of(&o, 2).unwrap().unwrap_err().to_string(),
        "address 192.168.1.1 already in use by c1"
    );
    assert_eq!(reply_of(&o, 3), Some(Ok(Reply::Done)));
    assert_eq!(reply_of(&o, 4), Some(Ok(Reply::Done)));
    // A dead holder's address is taken over.
    a.container_died(t0, "c1");
    a.claim(t0, RequestId(5), "c2", cidr("192.168.1.1/24"), false);
    assert_eq!(reply_of(&drain(&mut a), 5), Some(Ok(Reply::Done)));
    assert_eq!(a.lookup("c2", Some(cidr("192.168.1.0/24"))).len(), 1);
    assert!(
        a.ring().is_empty(),
        "no consensus started by outside claims"
    );
}

#[test]
fn lone_elector_times_out_with_the_reason() {
    let t0 = Instant::now();
    let mut a = new_alloc(
        1,
        config("10.32.0.0/12", InitMode::Consensus { quorum: 2 }),
        None,
        t0,
    );
    a.allocate(t0, RequestId(1), "c1", None);
    let o = drain(&mut a);
    assert!(o.replies.is_empty());
    assert!(
        o.sends
            .iter()
            .any(|s| matches!(s, AppSend::Broadcast { .. })),
        "the proposal is broadcast"
    );
    assert_eq!(
        a.status().status,
        "awaiting consensus (quorum: 2, known: 1)"
    );
    assert_eq!(
        a.status().pending_allocates,
        vec!["c1 10.32.0.0/12".to_string()]
    );
    // Ticks re-propose until the deadline.
    let mut now = t0;
    let mut proposals = 0;
    while let Some(t) = a.poll_timeout() {
        assert!(
            t <= t0 + Duration::from_secs(30),
            "nothing after the deadline"
        );
        now = t;
        a.handle_timeout(now);
        let o = drain(&mut a);
        proposals += o
            .sends
            .iter()
            .filter(|s| matches!(s, AppSend::Broadcast { .. }))
            .count();
        if let Some(r) = reply_of(&o, 1) {
            assert_eq!(
                r.unwrap_err().to_string(),
                "waiting for IPAM consensus: heard from 1 of the 2 peers needed (quorum 2); \
                 start weave on the other peers, or set --ipalloc-init (gave up after 30s)"
            );
            break;
        }
    }
    assert_eq!(now, t0 + Duration::from_secs(30));
    assert!(proposals >= 5, "re-proposed every tick: {proposals}");
}

#[test]
fn cancel_and_dead_containers() {
    let t0 = Instant::now();
    let mut a = new_alloc(
        1,
        config("10.32.0.0/12", InitMode::Consensus { quorum: 2 }),
        None,
        t0,
    );
    a.allocate(t0, RequestId(1), "aaaaaaaaaaaa", None);
    a.cancel(RequestId(1));
    assert_eq!(reply_of(&drain(&mut a), 1), Some(Err(IpamError::Cancelled)));
    a.cancel(RequestId(1));
    assert!(drain(&mut a).replies.is_empty(), "cancelled once");
    a.allocate(t0, RequestId(2), "bbbbbbbbbbbb", None);
    a.container_died(t0, "bbbbbbbbbbbb");
    assert_eq!(reply_of(&drain(&mut a), 2), Some(Err(IpamError::Cancelled)));

    let mut a = new_alloc(
        1,
        config("10.32.0.0/12", InitMode::Seed(vec![peer(1)])),
        None,
        t0,
    );
    a.allocate(t0, RequestId(1), "aaaaaaaaaaaa", None);
    a.allocate(t0, RequestId(2), "bbbbbbbbbbbb", None);
    drain(&mut a);
    a.container_died(t0, "aaaaaaaaaaaa");
    a.container_died(t0, "bbbbbbbbbbbb");
    a.container_started(t0 + Duration::from_secs(5), "bbbbbbbbbbbb");
    assert_eq!(a.poll_timeout().map(|t| t <= t0 + DEAD_GRACE), Some(true));
    a.handle_timeout(t0 + Duration::from_secs(29));
    assert_eq!(
        a.lookup("aaaaaaaaaaaa", None).len(),
        1,
        "kept during the grace"
    );
    a.handle_timeout(t0 + DEAD_GRACE);
    assert_eq!(
        a.lookup("aaaaaaaaaaaa", None).len(),
        0,
        "released after the grace"
    );
    assert_eq!(a.lookup("bbbbbbbbbbbb", None).len(), 1, "restarted: kept");
    a.container_destroyed(t0, "bbbbbbbbbbbb");
    assert!(a.owned().is_empty());
    a.check().unwrap();
}

#[test]
fn persistence_round_trip_and_discard() {
    let t0 = Instant::now();
    let cfg = config("10.32.0.0/12", InitMode::Seed(vec![peer(1)]));
    let mut a = new_alloc(1, cfg.clone(), None, t0);
    a.allocate(t0, RequestId(1), "aaaaaaaaaaaa", None);
    a.claim(
        t0,
        RequestId(2),
        "weave:expose",
        cidr("10.32.9.9/12"),
        false,
    );
    let saved = drain(&mut a).persisted.unwrap();
    let json = serde_json::to_string(&saved).unwrap();
    let back: Persisted = serde_json::from_str(&json).unwrap();
    assert_eq!(back, saved);

    let mut b = new_alloc(
        1,
        config("10.32.0.0/12", InitMode::Consensus { quorum: 3 }),
        Some(back.clone()),
        t0,
    );
    assert_eq!(b.ring(), a.ring());
    assert_eq!(b.owned(), a.owned());
    b.allocate(t0, RequestId(3), "cccccccccccc", None);
    assert_eq!(
        addr_of(&drain(&mut b), 3),
        cidr("10.32.0.2/12"),
        "restored allocations stay taken"
    );
    b.check().unwrap();
    // Pruning drops containers not running, not weave:expose.
    b.prune(t0, &BTreeSet::from(["cccccccccccc".to_string()]));
    assert_eq!(b.lookup("aaaaaaaaaaaa", None), vec![]);
    assert_eq!(b.lookup("weave:expose", None).len(), 1);

    // Another peer name or another range: discarded (and overwritten).
    let mut c = new_alloc(
        2,
        config("10.32.0.0/12", InitMode::Consensus { quorum: 3 }),
        Some(back.clone()),
        t0,
    );
    assert!(c.ring().is_empty());
    assert!(drain(&mut c).persisted.is_some());
    let d = new_alloc(
        1,
        config("10.0.0.0/16", InitMode::Consensus { quorum: 3 }),
        Some(back),
        t0,
    );
    assert!(d.ring().is_empty());
}

#[test]
fn status_json_shape() {
    let t0 = Instant::now();
    let mut a = new_alloc(
        1,
        config("10.32.0.0/12", InitMode::Seed(vec![peer(1), peer(2)])),
        None,
        t0,
    );
    a.allocate(t0, RequestId(1), "c1", None);
    drain(&mut a);
    let v = serde_json::to_value(a.status()).unwrap();
    assert_eq!(v["Status"], "ready");
    assert_eq!(v["Range"], "10.32.0.0/12");
    assert_eq!(v["RangeNumIPs"], 1 << 20);
    assert_eq!(v["ActiveIPs"], 1);
    assert_eq!(v["DefaultSubnet"], "10.32.0.0/12");
    assert_eq!(v["Paxos"], serde_json::Value::Null);
    assert_eq!(v["Entries"][1]["Token"], "10.40.0.0");
    assert_eq!(v["Entries"][1]["Size"], 1 << 19);
    assert_eq!(v["Entries"][1]["Peer"], "00:00:00:00:00:02");
    assert_eq!(v["Entries"][1]["IsKnownPeer"], false);
    assert_eq!(v["Entries"][0]["IsKnownPeer"], true);
    assert_eq!(v["PendingClaims"], serde_json::json!([]));
    assert_eq!(v["PendingAllocates"], serde_json::json!([]));
}

// ---- several peers ----

/// Allocators wired by a message list; `deliver` hands one message over.
pub(crate) struct Cluster {
    pub now: Instant,
    pub peers: Vec<Allocator>,
    /// (src index, dst index, kind, payload)
    pub wire: Vec<(usize, usize, GossipKind, Vec<u8>)>,
    pub replies: Vec<(usize, RequestId, Result<Reply, IpamError>)>,
    /// Which pairs can talk (partition = some false).
    pub link: Vec<Vec<bool>>,
    pub removed: Vec<bool>,
    /// What each peer last asked to persist.
    pub saved: Vec<Option<Persisted>>,
    /// Restarts so far (fresh UIDs).
    pub restarts: u64,
    /// Connections dropped because of a bad message: (receiver, error)
    pub rejected: Vec<(usize, String)>,
}

impl Cluster {
    pub fn new(n: usize, init: impl Fn(usize) -> InitMode, universe: &str) -> Self {
        let now = Instant::now();
        let peers = (0..n)
            .map(|i| new_alloc(i as u64 + 1, config(universe, init(i)), None, now))
            .collect();
        let mut c = Cluster {
            now,
            peers,
            wire: Vec::new(),
            replies: Vec::new(),
            link: vec![vec![true; n]; n],
            removed: vec![false; n],
            saved: vec![None; n],
            restarts: 0,
            rejected: Vec::new(),
        };
        c.pump();
        c.tell_peers();
        c
    }

    pub fn index(&self, p: PeerName) -> usize {
        (p.as_u64() - 1) as usize
    }

    pub fn connected(&self, a: usize, b: usize) -> bool {
        a != b && self.link[a][b] && !self.removed[a] && !self.removed[b]
    }

    /// Every peer learns who it can reach.
    pub fn tell_peers(&mut self) {
        for i in 0..self.peers.len() {
            if self.removed[i] {
                continue;
            }
            let list: Vec<PeerInfo> = (0..self.peers.len())
                .map(|j| PeerInfo {
                    name: peer(j as u64 + 1),
                    nickname: format!("host{}", j + 1),
                    reachable: i == j || self.connected(i, j),
                })
                .collect();
            let now = self.now;
            let _ = self.peers[i].on_event(now, AppEvent::Peers(list));
        }
        self.pump();
    }

    /// Move outputs of every allocator to the wire / the replies.
    pub fn pump(&mut self) {
        for i in 0..self.peers.len() {
            while let Some(o) = self.peers[i].poll_output() {
                match o {
                    Output::Reply { id, result } => self.replies.push((i, id, result)),
                    Output::Persist(p) => self.saved[i] = Some(p),
                    Output::Send(s) => {
                        if self.removed[i] {
                            continue;
                        }
                        match s {
                            AppSend::Unicast { dst, payload } => {
                                let j = self.index(dst);
                                if j < self.peers.len() && self.connected(i, j) {
                                    self.wire.push((i, j, GossipKind::Unicast, payload));
                                }
                            }
                            AppSend::Broadcast { payload } => {
                                for j in 0..self.peers.len() {
                                    if self.connected(i, j) {
                                        self.wire.push((
                                            i,
                                            j,
                                            GossipKind::Broadcast,
                                            payload.clone(),
                                        ));
                                    }
                                }
                            }
                            AppSend::Neighbours { payload } => {
                                for j in 0..self.peers.len() {
                                    if self.connected(i, j) {
                                        self.wire.push((
                                            i,
                                            j,
                                            GossipKind::Neighbours,
                                            payload.clone(),
                                        ));
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    pub fn deliver(&mut self, k: usize) {
        let (i, j, kind, payload) = self.wire.remove(k);
        if !self.connected(i, j) {
            return; // the link went down in flight
        }
        let now = self.now;
        let src = peer(i as u64 + 1);
        if let Err(e) = self.peers[j].on_event(
            now,
            AppEvent::Gossip {
                kind,
                src,
                from: src,
                payload,
            },
        ) {
            self.rejected.push((j, e.to_string()));
        }
        self.pump();
    }

    /// Deliver everything in order until quiet.
    pub fn settle(&mut self) {
        let mut n = 0;
        while !self.wire.is_empty() {
            self.deliver(0);
            n += 1;
            assert!(n < 100_000, "no quiescence");
        }
    }

    /// Advance virtual time by `d`, running timers, delivering as we go.
    pub fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        loop {
            self.settle();
            let next = self
                .peers
                .iter()
                .enumerate()
                .filter(|(i, _)| !self.removed[*i])
                .filter_map(|(_, p)| p.poll_timeout())
                .min();
            match next {
                Some(t) if t <= end => {
                    self.now = self.now.max(t);
                    let now = self.now;
                    for (i, p) in self.peers.iter_mut().enumerate() {
                        if !self.removed[i] && p.poll_timeout().is_some_and(|t| t <= now) {
                            p.handle_timeout(now);
                        }
                    }
                    self.pump();
                }
                _ => break,
            }
        }
        self.now = end;
        self.settle();
    }

    /// Peer `i` restarts from what it persisted: a new process (UID), same name and config;
    /// its waiting requests are gone.
    pub fn restart(&mut self, i: usize, cfg: Config) {
        self.restarts += 1;
        let uid = 1_000_000 + self.restarts;
        self.peers[i] = Allocator::new(
            cfg,
            peer(i as u64 + 1),
            format!("host{}", i + 1),
            uid,
            self.saved[i].clone(),
            Box::new(TestRng(uid)),
            self.now,
        );
        self.replies.retain(|r| r.0 != i);
        self.pump();
        self.tell_peers();
    }

    pub fn take_reply(&mut self, i: usize, id: u64) -> Option<Result<Reply, IpamError>> {
        let k = self
            .replies
            .iter()
            .position(|(p, r, _)| *p == i && *r == RequestId(id))?;
        Some(self.replies.remove(k).2)
    }

    pub fn partition(&mut self, side: &[usize]) {
        let n = self.peers.len();
        for a in 0..n {
            for b in 0..n {
                self.link[a][b] = side.contains(&a) == side.contains(&b);
            }
        }
        self.tell_peers();
    }

    pub fn heal(&mut self) {
        let n = self.peers.len();
        self.link = vec![vec![true; n]; n];
        self.tell_peers();
    }
}

fn get_addr(r: Option<Result<Reply, IpamError>>) -> Ipv4Cidr {
    match r {
        Some(Ok(Reply::Addr(c))) => c,
        other => panic!("{other:?}"),
    }
}

#[test]
fn three_peers_reach_consensus_and_split_50_25_25() {
    let mut c = Cluster::new(3, |_| InitMode::Consensus { quorum: 2 }, "10.32.0.0/12");
    // Merely connected: nothing happens (test 350).
    c.advance(Duration::from_secs(60));
    assert!(c.peers.iter().all(|p| p.ring().is_empty()));
    assert!(c.peers.iter().all(|p| p.status().status == "idle"));
    let t0 = c.now;
    c.peers[1].allocate(t0, RequestId(1), "c1", None);
    c.pump();
    c.settle();
    let a = get_addr(c.take_reply(1, 1));
    assert!(
        cidr("10.40.0.0/14").contains(a.addr),
        "{a}: peer 2 owns the second quarter"
    );
    let seeds = c.peers[1].ring().seeds.clone();
    assert_eq!(seeds, vec![peer(1), peer(2), peer(3)]);
    for p in &c.peers {
        assert_eq!(p.ring().seeds, seeds);
        p.check().unwrap();
    }
    assert_eq!(c.now, t0, "consensus without waiting for a tick");
}

#[test]
fn donation_when_a_peer_runs_out() {
    // A /28: 16 addresses; seeds 1 and 2 get 8 each; peer 1 allocates 12.
    let mut c = Cluster::new(2, |_| InitMode::Seed(vec![peer(1), peer(2)]), "10.9.0.0/28");
    let now = c.now;
    let mut got = BTreeSet::new();
    for k in 0..13u64 {
        c.peers[0].allocate(now, RequestId(k), &format!("c{k}"), None);
        c.pump();
        c.settle();
    }
    for k in 0..13u64 {
        if let Some(r) = c.take_reply(0, k) {
            assert!(got.insert(get_addr(Some(r))), "duplicate");
        }
    }
    // Host range of the /28 is 14 addresses; peer 2 keeps at least one of its own.
    assert!(got.len() >= 12, "{} allocated: {got:?}", got.len());
    assert!(got.iter().all(|c| c.prefix_len == 28));
    for p in &c.peers {
        p.check().unwrap();
    }
}

#[test]
fn claim_of_an_address_another_peer_owns() {
    let mut c = Cluster::new(
        2,
        |_| InitMode::Seed(vec![peer(1), peer(2)]),
        "10.32.0.0/12",
    );
    let now = c.now;
    // 10.40.0.5 is in peer 2's half.
    c.peers[0].claim(now, RequestId(1), "c1", cidr("10.40.0.5/12"), false);
    c.pump();
    c.settle();
    assert_eq!(c.take_reply(0, 1), Some(Ok(Reply::Done)));
    assert_eq!(c.peers[0].ring().owner(0x0a28_0005), Some(peer(1)));
    // Peer 2 uses 10.40.1.1; peer 1's claim of it is denied.
    c.peers[1].claim(now, RequestId(2), "c2", cidr("10.40.1.1/12"), false);
    c.peers[0].claim(now, RequestId(3), "c3", cidr("10.40.1.1/12"), false);
    c.pump();
    c.settle();
    assert_eq!(c.take_reply(1, 2), Some(Ok(Reply::Done)));
    assert_eq!(
        c.take_reply(0, 3).unwrap().unwrap_err().to_string(),
        "address 10.40.1.1 is owned by other peer 00:00:00:00:00:02(host2)"
    );
    for p in &c.peers {
        p.check().unwrap();
    }
}

#[test]
fn claim_from_an_unreachable_owner_fails_after_tries() {
    let mut c = Cluster::new(
        2,
        |_| InitMode::Seed(vec![peer(1), peer(2)]),
        "10.32.0.0/12",
    );
    c.partition(&[0]);
    let now = c.now;
    c.peers[0].claim(now, RequestId(1), "c1", cidr("10.40.0.5/12"), false);
    c.peers[0].claim(now, RequestId(2), "c2", cidr("10.40.0.6/12"), true);
    c.pump();
    c.advance(Duration::from_secs(20));
    assert_eq!(c.take_reply(0, 1), None, "still trying");
    c.advance(Duration::from_secs(15));
    let err = c.take_reply(0, 1).unwrap().unwrap_err();
    assert!(
        matches!(err, IpamError::OwnerUnreachable { tries: 6, .. }),
        "{err}"
    );
    assert_eq!(
        c.take_reply(0, 2),
        Some(Ok(Reply::Done)),
        "no error on unknown: goes ahead"
    );
    // Reachable again: the claim is handed over at once.
    c.heal();
    c.peers[0].claim(c.now, RequestId(3), "c1", cidr("10.40.0.5/12"), false);
    c.pump();
    c.settle();
    assert_eq!(c.take_reply(0, 3), Some(Ok(Reply::Done)));
}

#[test]
fn allocation_in_a_partition_waits_with_the_reason() {
    let mut c = Cluster::new(2, |_| InitMode::Seed(vec![peer(1), peer(2)]), "10.9.0.0/29");
    c.partition(&[0]);
    let now = c.now;
    // Peer 1 owns 10.9.0.0-3: host range leaves 1, 2, 3.
    for k in 0..4u64 {
        c.peers[0].allocate(now, RequestId(k), &format!("c{k}"), None);
    }
    c.pump();
    c.settle();
    assert_eq!(
        c.peers[0].status().status,
        STATUS_UNREACHABLE,
        "{:?}",
        c.peers[0].status()
    );
    c.advance(Duration::from_secs(31));
    let err = c.take_reply(0, 3).unwrap().unwrap_err();
    assert_eq!(
        err.to_string(),
        "all IP ranges are owned by unreachable peers - use 'weave rmpeer' if they are dead (gave up after 30s)"
    );
}

#[test]
fn leave_hands_over_and_rmpeer_takes_over() {
    let mut c = Cluster::new(
        3,
        |_| InitMode::Seed(vec![peer(1), peer(2), peer(3)]),
        "10.32.0.0/12",
    );
    let now = c.now;
    c.peers[2].leave(now);
    c.pump();
    c.settle();
    let owners = c.peers[0].ring().peers();
    assert_eq!(
        owners,
        vec![peer(1), peer(2)],
        "peer 3's range went to an heir"
    );
    assert_eq!(
        c.peers[0].ring(),
        &c.peers[1].ring().clone().with_me(peer(1))
    );
    // Peer 2 stops for good; peer 1 takes its ranges over by nickname.
    c.removed[1] = true;
    c.tell_peers();
    let before = c.peers[0]
        .status()
        .entries
        .iter()
        .filter(|e| e.peer == peer(1).to_string())
        .count();
    let gained = c.peers[0].rmpeer(c.now, "host2").unwrap();
    assert!(gained >= 1 << 18, "{gained}");
    assert_eq!(c.peers[0].ring().peers(), vec![peer(1)]);
    assert!(before >= 1);
    assert_eq!(c.peers[0].rmpeer(c.now, "host2").unwrap(), 0);
    assert!(c.peers[0].rmpeer(c.now, "nonsense").is_err());
    c.peers[0].check().unwrap();
}

#[test]
fn different_seeds_are_refused_loudly() {
    let mut c = Cluster::new(
        2,
        |i| InitMode::Seed(vec![peer(i as u64 + 1)]),
        "10.32.0.0/12",
    );
    c.peers[0].allocate(c.now, RequestId(1), "c1", None);
    c.pump();
    c.advance(Duration::from_secs(31));
    assert!(!c.rejected.is_empty());
    assert!(
        c.rejected[0].1.starts_with(
            "IP allocation was seeded by different peers (received: [00:00:00:00:00:0"
        ),
        "{}",
        c.rejected[0].1
    );
}

impl Ring {
    fn with_me(mut self, me: PeerName) -> Ring {
        self.me = me;
        self
    }
}

#[test]
fn observer_calls_an_election_and_gets_space() {
    let mut c = Cluster::new(
        3,
        |i| {
            if i == 0 {
                InitMode::Observer
            } else {
                InitMode::Consensus { quorum: 2 }
            }
        },
        "10.32.0.0/12",
    );
    // Block delivery for a moment to see the observer's status while it waits.
    let now = c.now;
    c.peers[0].allocate(now, RequestId(1), "c1", None);
    assert_eq!(c.peers[0].status().status, "priming");
    assert_eq!(c.peers[0].status().paxos, None);
    c.pump();
    c.settle();
    let a = get_addr(c.take_reply(0, 1));
    let ring = c.peers[0].ring().clone();
    assert!(
        !ring.seeds.contains(&peer(1)),
        "observers get no share at creation: {:?}",
        ring.seeds
    );
    assert_eq!(
        ring.owner(u64::from(u32::from(a.addr))),
        Some(peer(1)),
        "space donated to the observer"
    );
    for p in &c.peers {
        p.check().unwrap();
    }
}

#[test]
fn observer_alone_times_out_saying_why() {
    let mut c = Cluster::new(2, |_| InitMode::Observer, "10.32.0.0/12");
    let now = c.now;
    c.peers[0].prime(now, RequestId(1));
    c.pump();
    c.advance(Duration::from_secs(31));
    let err = c.take_reply(0, 1).unwrap().unwrap_err().to_string();
    assert!(
        err.starts_with("waiting for the IP allocation ring: this peer is an observer"),
        "{err}"
    );
}

#[test]
fn status_lines_per_peer() {
    let mut c = Cluster::new(
        3,
        |_| InitMode::Seed(vec![peer(1), peer(2), peer(3)]),
        "10.32.0.0/12",
    );
    c.peers[1].allocate(c.now, RequestId(1), "c1", None);
    c.pump();
    c.removed[2] = true;
    c.tell_peers();
    let lines = c.peers[1].status().peer_lines(&peer(2).to_string());
    assert_eq!(
        lines,
        vec![
            "00:00:00:00:00:02(host2)                262144 IPs (25.0% of total) (1 active)",
            "00:00:00:00:00:01(host1)                524288 IPs (50.0% of total)",
            "00:00:00:00:00:03(host3)                262144 IPs (25.0% of total) - unreachable!",
        ]
    );
    let empty = Cluster::new(1, |_| InitMode::Observer, "10.32.0.0/12");
    assert!(empty.peers[0]
        .status()
        .peer_lines(&peer(1).to_string())
        .is_empty());
}
