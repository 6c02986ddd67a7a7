//! The allocator (spec §1.3–1.8, §1.11): one state machine per peer, fed requests, Docker events
//! and mesh events with the time, polled for [`Output`]s. Requests that cannot be answered yet
//! wait in three queues (primes, claims, allocates), retried in that order after every ring
//! change and every [`TICK`]; each fails after `request_timeout` with the reason it waited.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand_core::RngCore;

use super::codec::{Body, Message, State};
use super::paxos::{Node, NodeId};
use super::ring::{ip, Ring, RingError};
use super::space::Space;
use super::{
    ClaimStatus, Config, EntryStatus, InitMode, IpamError, IpamStatus, Output, PaxosStatus,
    Persisted, PersistedEntry, PersistedOwned, PersistedRing, Reply, RequestId, PERSISTED_VERSION,
    STATUS_UNREACHABLE,
};
use crate::addr::Ipv4Cidr;
use crate::mesh::app::{AppEvent, AppSend, GossipKind, PeerInfo};
use crate::mesh::peer::PeerName;

/// Retry period for pending requests and Paxos proposals.
pub const TICK: Duration = Duration::from_secs(5);
/// Full state to a few neighbours this often (as the mesh's own gossip).
pub const GOSSIP_INTERVAL: Duration = Duration::from_secs(30);
/// A dead container's addresses are kept this long, for `docker restart`.
pub const DEAD_GRACE: Duration = Duration::from_secs(30);
/// A claim of an address whose owner cannot be reached fails after this many ticks.
pub const CLAIM_TRIES: u32 = 5;

/// Idents for "no particular container".
const ANONYMOUS: &str = "_";

#[derive(Debug, Clone, PartialEq, Eq)]
struct Owned {
    is_container: bool,
    cidrs: Vec<Ipv4Cidr>,
}

#[derive(Debug, Clone)]
struct PendingAlloc {
    id: RequestId,
    ident: String,
    subnet: Ipv4Cidr,
    since: Instant,
}

#[derive(Debug, Clone)]
struct PendingClaim {
    /// None once answered early (`no_error_on_unknown`) or for pre-claims.
    id: Option<RequestId>,
    ident: String,
    cidr: Ipv4Cidr,
    no_error_on_unknown: bool,
    /// Ticks on which the owner could not be asked.
    tries: u32,
    since: Instant,
}

#[derive(Debug, Clone)]
struct PendingPrime {
    id: RequestId,
    since: Instant,
}

enum Step {
    Done(Result<Reply, IpamError>),
    Wait,
}

pub struct Allocator {
    config: Config,
    me: PeerName,
    nickname: String,
    uid: u64,
    rng: Box<dyn RngCore + Send>,
    ring: Ring,
    space: Space,
    /// Electors (consensus mode) while there is no ring.
    paxos: Option<Node>,
    /// We proposed: re-propose every tick until there is a ring.
    proposing: bool,
    nicknames: BTreeMap<PeerName, String>,
    reachable: BTreeSet<PeerName>,
    /// Peers we had IPAM messages from.
    ipam_peers: BTreeSet<PeerName>,
    owned: BTreeMap<String, Owned>,
    /// `owned` as persisted, kept in step, shared with the [`Persisted`] handed out (so
    /// persisting after a change costs O(1) here, not O(containers)).
    persist_owned: Arc<BTreeMap<String, PersistedOwned>>,
    dead: BTreeMap<String, Instant>,
    primes: Vec<PendingPrime>,
    claims: Vec<PendingClaim>,
    allocs: Vec<PendingAlloc>,
    outputs: VecDeque<Output>,
    dirty: bool,
    next_tick: Instant,
    next_gossip: Instant,
    left: bool,
}

impl std::fmt::Debug for Allocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Allocator")
            .field("me", &self.me)
            .field("ring", &self.ring)
            .field("owned", &self.owned)
            .finish_non_exhaustive()
    }
}

/// First and one-past-last address of a CIDR, as ring positions.
pub fn bounds(c: Ipv4Cidr) -> (u64, u64) {
    let n = c.network();
    let start = u64::from(u32::from(n.addr));
    (
        start,
        start + (1u64 << (32 - u32::from(c.prefix_len.min(32)))),
    )
}

/// Where addresses of `subnet` may be handed out: not its network or broadcast address.
fn host_range(subnet: Ipv4Cidr) -> (u64, u64) {
    let (s, e) = bounds(subnet);
    if e - s > 2 {
        (s + 1, e - 1)
    } else {
        (s, e)
    }
}

/// Docker container IDs are hex; `weave:expose` and address strings are not, and are never
/// pruned or marked dead.
fn looks_like_container(ident: &str) -> bool {
    ident.len() >= 12 && ident.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `a` minus `b`, both sorted disjoint half-open lists.
fn subtract(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(mut s, e) in a {
        for &(bs, be) in b {
            if be <= s || bs >= e {
                continue;
            }
            if bs > s {
                out.push((s, bs));
            }
            s = s.max(be);
            if s >= e {
                break;
            }
        }
        if s < e {
            out.push((s, e));
        }
    }
    out
}

impl Allocator {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Config,
        me: PeerName,
        nickname: String,
        uid: u64,
        persisted: Option<Persisted>,
        rng: Box<dyn RngCore + Send>,
        now: Instant,
    ) -> Self {
        let universe = config.universe.network();
        let (start, end) = bounds(universe);
        let paxos = match &config.init {
            InitMode::Consensus { quorum } => Some(Node::new(NodeId { name: me, uid }, *quorum)),
            _ => None,
        };
        let mut a = Allocator {
            config: Config {
                universe,
                default_subnet: config.default_subnet.network(),
                ..config
            },
            me,
            nickname: nickname.clone(),
            uid,
            rng,
            ring: Ring::new(start, end, me),
            space: Space::default(),
            paxos,
            proposing: false,
            nicknames: [(me, nickname)].into(),
            reachable: BTreeSet::new(),
            ipam_peers: BTreeSet::new(),
            owned: BTreeMap::new(),
            persist_owned: Arc::default(),
            dead: BTreeMap::new(),
            primes: Vec::new(),
            claims: Vec::new(),
            allocs: Vec::new(),
            outputs: VecDeque::new(),
            dirty: false,
            next_tick: now + TICK,
            next_gossip: now + GOSSIP_INTERVAL,
            left: false,
        };
        if let Some(p) = persisted {
            match a.restore(&p) {
                Ok(()) => {
                    tracing::info!(
                        entries = a.ring.entries.len(),
                        idents = a.owned.len(),
                        "IPAM: restored persisted ring and allocations"
                    );
                    if let InitMode::Seed(_) = &a.config.init {
                        tracing::info!("IPAM: persisted ring found; --ipalloc-init seed ignored");
                    }
                }
                Err(why) => {
                    tracing::warn!("IPAM: {why}: discarding persisted data");
                    a.ring = Ring::new(start, end, me);
                    a.space.clear();
                    a.owned.clear();
                    a.persist_owned = Arc::default();
                    a.dirty = true;
                }
            }
        }
        if a.ring.is_empty() {
            if let InitMode::Seed(peers) = &a.config.init {
                let peers = peers.clone();
                a.create_ring(now, &peers);
            }
        }
        a.flush();
        a
    }

    fn restore(&mut self, p: &Persisted) -> Result<(), String> {
        if p.version != PERSISTED_VERSION {
            return Err(format!("persisted data has format {}", p.version));
        }
        if p.peer_name != self.me.to_string() {
            return Err(format!(
                "Deleting persisted data for peername {}",
                p.peer_name
            ));
        }
        if p.range != self.config.universe.to_string() {
            return Err(format!(
                "Deleting persisted data for IPAM range {}; our range is {}",
                p.range, self.config.universe
            ));
        }
        if p.ring.entries.is_empty() {
            return Err("No valid persisted data".into());
        }
        let parse = |s: &str| {
            s.parse::<PeerName>()
                .map_err(|e| format!("persisted ring: {e}"))
        };
        let mut ring = Ring::new(self.ring.start, self.ring.end, self.me);
        for e in &p.ring.entries {
            ring.entries.push(super::ring::Entry {
                token: u64::from(u32::from(e.token)),
                peer: parse(&e.peer)?,
                version: e.version,
                free: e.free,
            });
        }
        ring.seeds = p
            .ring
            .seeds
            .iter()
            .map(|s| parse(s))
            .collect::<Result<_, _>>()?;
        ring.check_invariants().map_err(|e| e.to_string())?;
        let mut owned = BTreeMap::new();
        for (ident, o) in p.owned.iter() {
            let cidrs = o
                .cidrs
                .iter()
                .map(|c| c.parse::<Ipv4Cidr>().map_err(|e| e.to_string()))
                .collect::<Result<Vec<_>, _>>()?;
            owned.insert(
                ident.clone(),
                Owned {
                    is_container: o.is_container,
                    cidrs,
                },
            );
        }
        for (name, nick) in &p.nicknames {
            if let Ok(n) = name.parse::<PeerName>() {
                if n != self.me {
                    self.nicknames.insert(n, nick.clone());
                }
            }
        }
        self.ring = ring;
        self.sync_space();
        for o in owned.values() {
            for c in &o.cidrs {
                self.space.take(u64::from(u32::from(c.addr)));
            }
        }
        self.owned = owned;
        self.persist_owned = Arc::new(p.owned.as_ref().clone());
        self.report_free();
        Ok(())
    }

    // ---- requests ----

    pub fn allocate(&mut self, now: Instant, id: RequestId, ident: &str, subnet: Option<Ipv4Cidr>) {
        let subnet = subnet.unwrap_or(self.config.default_subnet).network();
        if let Some(c) = self.lookup(ident, Some(subnet)).first() {
            self.dead.remove(ident);
            self.reply(id, Ok(Reply::Addr(*c)));
        } else if self.left {
            self.reply(id, Err(IpamError::Left));
        } else if !overlaps(bounds(subnet), (self.ring.start, self.ring.end)) {
            self.reply(
                id,
                Err(IpamError::OutOfBounds {
                    subnet,
                    universe: self.config.universe,
                }),
            );
        } else {
            self.dead.remove(ident);
            self.wake(now);
            let p = PendingAlloc {
                id,
                ident: ident.to_string(),
                subnet,
                since: now,
            };
            match self.try_allocate(now, &p) {
                Step::Done(r) => self.reply(id, r),
                Step::Wait => {
                    if !self.ring.is_empty() {
                        self.ask_for_space(subnet);
                    }
                    self.allocs.push(p);
                }
            }
        }
        self.flush();
    }

    pub fn claim(
        &mut self,
        now: Instant,
        id: RequestId,
        ident: &str,
        cidr: Ipv4Cidr,
        no_error_on_unknown: bool,
    ) {
        self.claim_inner(now, Some(id), ident, cidr, no_error_on_unknown);
        self.flush();
    }

    fn claim_inner(
        &mut self,
        now: Instant,
        id: Option<RequestId>,
        ident: &str,
        cidr: Ipv4Cidr,
        no_error_on_unknown: bool,
    ) {
        if self.left {
            if let Some(id) = id {
                self.reply(id, Err(IpamError::Left));
            }
            return;
        }
        self.dead.remove(ident);
        let a = u64::from(u32::from(cidr.addr));
        if !self.config.universe.contains(cidr.addr) {
            let r = self.claim_outside(ident, cidr);
            if let Some(id) = id {
                self.reply(id, r);
            }
            return;
        }
        self.wake(now);
        let mut p = PendingClaim {
            id,
            ident: ident.to_string(),
            cidr,
            no_error_on_unknown,
            tries: 0,
            since: now,
        };
        match self.try_claim(now, &mut p, false) {
            Step::Done(r) => {
                if let Some(id) = id {
                    self.reply(id, r);
                }
            }
            Step::Wait => {
                if self.ring.is_empty() && no_error_on_unknown {
                    if let Some(id) = p.id.take() {
                        self.reply(id, Ok(Reply::Done));
                    }
                }
                tracing::debug!(addr = %ip(a), ident, "IPAM: claim waits");
                self.claims.push(p);
            }
        }
    }

    /// Addresses outside the universe are not managed, only recorded so duplicates are caught.
    fn claim_outside(&mut self, ident: &str, cidr: Ipv4Cidr) -> Result<Reply, IpamError> {
        match self.holder(cidr.addr) {
            None => {
                self.record(ident, cidr);
                Ok(Reply::Done)
            }
            Some(h) if h == ident => Ok(Reply::Done),
            Some(h) if self.dead.contains_key(&h) => {
                self.forget(&h, cidr.addr);
                self.record(ident, cidr);
                Ok(Reply::Done)
            }
            Some(_) if ident == ANONYMOUS => Ok(Reply::Done),
            Some(h) => Err(IpamError::InUseBy {
                addr: cidr.addr,
                ident: h,
            }),
        }
    }

    pub fn prime(&mut self, now: Instant, id: RequestId) {
        if !self.ring.is_empty() {
            self.reply(id, Ok(Reply::Done));
        } else if self.left {
            self.reply(id, Err(IpamError::Left));
        } else {
            self.wake(now);
            self.primes.push(PendingPrime { id, since: now });
            self.establish_ring(now);
        }
        self.flush();
    }

    pub fn cancel(&mut self, id: RequestId) {
        let before = (self.primes.len(), self.claims.len(), self.allocs.len());
        self.primes.retain(|p| p.id != id);
        self.claims.retain(|c| c.id != Some(id));
        self.allocs.retain(|a| a.id != id);
        if before != (self.primes.len(), self.claims.len(), self.allocs.len()) {
            self.reply(id, Err(IpamError::Cancelled));
        }
    }

    pub fn lookup(&self, ident: &str, subnet: Option<Ipv4Cidr>) -> Vec<Ipv4Cidr> {
        let subnet = subnet.unwrap_or(self.config.default_subnet);
        self.owned
            .get(ident)
            .map(|o| {
                o.cidrs
                    .iter()
                    .filter(|c| subnet.contains(c.addr))
                    .copied()
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn free(&mut self, now: Instant, ident: &str, addr: Ipv4Addr) -> Result<(), IpamError> {
        let held = self
            .owned
            .get(ident)
            .is_some_and(|o| o.cidrs.iter().any(|c| c.addr == addr));
        if !held {
            return Err(IpamError::FreeNotFound {
                addr,
                ident: ident.to_string(),
            });
        }
        self.forget(ident, addr);
        self.after_release(now);
        Ok(())
    }

    pub fn delete(&mut self, now: Instant, ident: &str) -> Result<(), IpamError> {
        if !self.owned.contains_key(ident) {
            return Err(IpamError::DeleteNothing {
                ident: ident.to_string(),
            });
        }
        self.release_all(ident);
        self.after_release(now);
        Ok(())
    }

    pub fn owned(&self) -> Vec<(String, Vec<Ipv4Cidr>)> {
        self.owned
            .iter()
            .map(|(k, o)| (k.clone(), o.cidrs.clone()))
            .collect()
    }

    pub fn container_started(&mut self, _now: Instant, ident: &str) {
        self.dead.remove(ident);
    }

    /// Addresses are released after [`DEAD_GRACE`] unless it starts again first; its waiting
    /// requests are cancelled now.
    pub fn container_died(&mut self, now: Instant, ident: &str) {
        if self.owned.contains_key(ident) {
            self.dead.insert(ident.to_string(), now);
        }
        self.cancel_ident(ident);
        self.flush();
    }

    pub fn container_destroyed(&mut self, now: Instant, ident: &str) {
        self.dead.remove(ident);
        self.cancel_ident(ident);
        if self.owned.contains_key(ident) {
            self.release_all(ident);
            self.after_release(now);
        }
        self.flush();
    }

    /// At start-up: drop the records of containers that are not running.
    pub fn prune(&mut self, now: Instant, running: &BTreeSet<String>) {
        let gone: Vec<String> = self
            .owned
            .iter()
            .filter(|(k, o)| o.is_container && !running.contains(*k))
            .map(|(k, _)| k.clone())
            .collect();
        for ident in &gone {
            tracing::info!(
                ident,
                "IPAM: pruning addresses of a container that is not running"
            );
            self.release_all(ident);
        }
        if !gone.is_empty() {
            self.after_release(now);
        }
        self.flush();
    }

    /// An address found in use at start-up: claimed without a reply, never failing.
    pub fn preclaim(&mut self, now: Instant, ident: &str, cidr: Ipv4Cidr) {
        self.claim_inner(now, None, ident, cidr, true);
        self.flush();
    }

    /// `weave reset`: cancel everything, hand our ranges to an heir, forget our space.
    pub fn leave(&mut self, _now: Instant) {
        for id in self
            .primes
            .drain(..)
            .map(|p| p.id)
            .chain(self.claims.drain(..).filter_map(|c| c.id))
            .chain(self.allocs.drain(..).map(|a| a.id))
            .collect::<Vec<_>>()
        {
            self.reply(id, Err(IpamError::Cancelled));
        }
        if !self.ring.is_empty() {
            match self.heir() {
                Some(heir) => {
                    tracing::info!(heir = %self.label(heir), "IPAM: leaving: handing our ranges over");
                    self.ring.transfer(self.me, heir);
                    self.broadcast();
                }
                None => tracing::info!("IPAM: leaving: no other peer to hand our ranges to"),
            }
        }
        self.space.clear();
        self.owned.clear();
        self.persist_owned = Arc::default();
        self.dead.clear();
        self.paxos = None;
        self.proposing = false;
        self.left = true;
        self.dirty = true;
        self.flush();
    }

    /// Heir: a reachable peer owning entries, else a reachable IPAM peer, else an unreachable
    /// owner, else any peer we remember.
    fn heir(&self) -> Option<PeerName> {
        let owners: Vec<PeerName> = self
            .ring
            .peers()
            .into_iter()
            .filter(|p| *p != self.me)
            .collect();
        owners
            .iter()
            .find(|p| self.reachable.contains(p))
            .or_else(|| self.ipam_peers.iter().find(|p| self.reachable.contains(p)))
            .or_else(|| owners.first())
            .or_else(|| self.nicknames.keys().find(|p| **p != self.me))
            .copied()
    }

    /// Take over `peer`'s ranges (name or nickname): how many addresses we gained.
    pub fn rmpeer(&mut self, now: Instant, peer: &str) -> Result<u64, IpamError> {
        let target = match self.nicknames.iter().find(|(_, n)| n.as_str() == peer) {
            Some((name, _)) => *name,
            None => peer
                .parse::<PeerName>()
                .map_err(|_| IpamError::UnknownPeer(peer.to_string()))?,
        };
        if target == self.me || self.ring.is_empty() || self.left {
            return Ok(0);
        }
        let before = self.space.total_free();
        if self.ring.transfer(target, self.me).is_empty() {
            return Ok(0);
        }
        self.sync_space();
        self.report_free();
        self.dirty = true;
        self.broadcast();
        let gained = self.space.total_free().saturating_sub(before);
        tracing::info!(peer = %self.label(target), gained, "IPAM: took over a peer's ranges (rmpeer)");
        self.retry(now, false);
        self.flush();
        Ok(gained)
    }

    // ---- mesh ----

    pub fn on_event(&mut self, now: Instant, event: AppEvent) -> Result<(), IpamError> {
        let r = match event {
            AppEvent::Peers(peers) => {
                self.on_peers(now, &peers);
                Ok(())
            }
            AppEvent::Gossip {
                kind,
                src,
                from,
                payload,
            } => self.on_gossip(now, kind, src, from, &payload),
        };
        self.flush();
        r
    }

    fn on_peers(&mut self, now: Instant, peers: &[PeerInfo]) {
        let reachable: BTreeSet<PeerName> = peers
            .iter()
            .filter(|p| p.reachable && p.name != self.me)
            .map(|p| p.name)
            .collect();
        for p in peers {
            if p.name != self.me && !p.nickname.is_empty() {
                self.nicknames.insert(p.name, p.nickname.clone());
            }
        }
        let new: Vec<PeerName> = reachable.difference(&self.reachable).copied().collect();
        self.reachable = reachable;
        // Newcomers get our state at once rather than at the next periodic gossip.
        if self.gossips() {
            for p in new {
                self.unicast(p, Message::State(self.state()));
            }
        }
        self.retry(now, false);
    }

    fn on_gossip(
        &mut self,
        now: Instant,
        kind: GossipKind,
        src: PeerName,
        from: PeerName,
        payload: &[u8],
    ) -> Result<(), IpamError> {
        let msg = Message::decode(payload).map_err(|e| IpamError::Decode {
            from,
            why: e.to_string(),
        })?;
        if src == self.me || self.left {
            return Ok(());
        }
        self.ipam_peers.insert(src);
        match msg {
            Message::SpaceRequest { start, end } => self.donate(src, start, end),
            Message::Denied { start, end } => self.denied(src, start, end),
            Message::State(state) => {
                for (p, n) in state.nicknames {
                    if p != self.me {
                        self.nicknames.insert(p, n);
                    }
                }
                self.on_state(now, kind, src, state.body)?;
            }
        }
        Ok(())
    }

    fn on_state(
        &mut self,
        now: Instant,
        kind: GossipKind,
        src: PeerName,
        body: Body,
    ) -> Result<(), IpamError> {
        match body {
            Body::Request => {
                if !self.ring.is_empty() {
                    self.unicast(src, Message::State(self.state()));
                } else if self.paxos.is_some() {
                    // An observer needs a ring: electors start consensus for it.
                    self.establish_ring(now);
                }
            }
            Body::Paxos(knows) => {
                if !self.ring.is_empty() {
                    self.unicast(src, Message::State(self.state()));
                } else if let Some(node) = &mut self.paxos {
                    node.update(&knows);
                    let changed = node.think();
                    if let Some(v) = node.consensus() {
                        self.create_ring(now, &v.value);
                    } else if changed {
                        self.broadcast();
                    }
                }
            }
            Body::Ring(theirs) => {
                let was_empty = self.ring.is_empty();
                let space = &self.space;
                let updated = self
                    .ring
                    .merge(&theirs, |s, e| space.has_allocations_in(s, e))
                    .map_err(|e| self.ring_error(e))?;
                if updated {
                    self.sync_space();
                    self.report_free();
                    self.dirty = true;
                    if was_empty {
                        tracing::info!(from = %self.label(src), "IPAM: learnt the ring");
                        self.paxos = None;
                        self.proposing = false;
                    }
                    // Pass on what was new to us, epidemic style.
                    if kind == GossipKind::Neighbours {
                        self.send(AppSend::Neighbours {
                            payload: Message::State(self.state()).encode(),
                        });
                    }
                    self.retry(now, false);
                }
            }
        }
        Ok(())
    }

    fn ring_error(&self, e: RingError) -> IpamError {
        match e {
            RingError::DifferentSeeds { received, ours } => {
                let show = |v: &[PeerName]| {
                    v.iter()
                        .map(|p| self.label(*p))
                        .collect::<Vec<_>>()
                        .join(" ")
                };
                IpamError::DifferentSeeds {
                    received: show(&received),
                    ours: show(&ours),
                }
            }
            e => IpamError::Ring(e),
        }
    }

    /// A peer asks for space in `[start, end)`.
    fn donate(&mut self, src: PeerName, start: u64, end: u64) {
        if self.ring.is_empty() {
            return;
        }
        let (lo, hi) = (start.max(self.ring.start), end.min(self.ring.end));
        match (lo < hi)
            .then(|| self.space.biggest_aligned_free(lo, hi))
            .flatten()
        {
            Some((mut s, e)) => {
                let size = e - s;
                // Keep at least half of what we have free there.
                if size >= 2 && size * 2 > self.space.free_in(lo, hi) {
                    s += size / 2;
                }
                tracing::debug!(to = %self.label(src), from = %ip(s), count = e - s, "IPAM: donating");
                self.space.remove(s, e);
                self.ring.grant(s, e, src);
                self.report_free();
                self.dirty = true;
                self.broadcast();
                self.unicast(src, Message::State(self.state()));
            }
            None => {
                self.unicast(src, Message::State(self.state()));
                self.unicast(src, Message::Denied { start, end });
            }
        }
    }

    /// `src` has nothing free in `[start, end)`: claims of an address there that `src` still
    /// owns fail. (Its ring came just before: a claim whose address it gave away meanwhile
    /// has been sent on to the new owner.)
    fn denied(&mut self, src: PeerName, start: u64, end: u64) {
        let mut failed = Vec::new();
        let owner = self.label(src);
        let ring = &self.ring;
        self.claims.retain(|c| {
            let a = u64::from(u32::from(c.cidr.addr));
            if a >= start && a < end && ring.owner(a) == Some(src) {
                failed.push((c.id, c.cidr.addr));
                false
            } else {
                true
            }
        });
        for (id, addr) in failed {
            match id {
                Some(id) => self.reply(
                    id,
                    Err(IpamError::OwnedByOtherPeer {
                        addr,
                        peer: owner.clone(),
                    }),
                ),
                None => {
                    tracing::warn!(%addr, owner, "IPAM: an address in use here is allocated by another peer")
                }
            }
        }
    }

    // ---- timers ----

    pub fn handle_timeout(&mut self, now: Instant) {
        let expired: Vec<String> = self
            .dead
            .iter()
            .filter(|(_, t)| now >= **t + DEAD_GRACE)
            .map(|(k, _)| k.clone())
            .collect();
        if !expired.is_empty() {
            for ident in &expired {
                self.dead.remove(ident);
                tracing::debug!(ident, "IPAM: releasing the addresses of a dead container");
                self.release_all(ident);
            }
            self.after_release(now);
        }
        if now >= self.next_tick {
            self.next_tick = now + TICK;
            if self.ring.is_empty() && !self.left {
                if self.proposing {
                    self.propose(now);
                } else if self.config.init == InitMode::Observer
                    && (!self.primes.is_empty()
                        || !self.claims.is_empty()
                        || !self.allocs.is_empty())
                {
                    self.broadcast();
                }
            }
            self.retry(now, true);
        }
        if now >= self.next_gossip {
            self.next_gossip = now + GOSSIP_INTERVAL;
            if self.gossips() {
                self.send(AppSend::Neighbours {
                    payload: Message::State(self.state()).encode(),
                });
            }
        }
        self.expire(now);
        self.flush();
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let timeout = self.config.request_timeout;
        let waiting = !self.primes.is_empty() || !self.claims.is_empty() || !self.allocs.is_empty();
        let deadlines = self
            .primes
            .iter()
            .map(|p| p.since)
            .chain(
                self.claims
                    .iter()
                    .filter(|c| c.id.is_some())
                    .map(|c| c.since),
            )
            .chain(self.allocs.iter().map(|a| a.since))
            .map(|t| t + timeout);
        let gossip = self.gossips().then_some(self.next_gossip);
        deadlines
            .chain(self.dead.values().map(|t| *t + DEAD_GRACE))
            .chain((waiting || self.proposing).then_some(self.next_tick))
            .chain(gossip)
            .min()
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    // ---- internals ----

    /// A request arrived while nothing was ticking: tick from now on.
    fn wake(&mut self, now: Instant) {
        if self.next_tick < now {
            self.next_tick = now + TICK;
        }
    }

    fn reply(&mut self, id: RequestId, result: Result<Reply, IpamError>) {
        self.outputs.push_back(Output::Reply { id, result });
    }

    fn send(&mut self, s: AppSend) {
        self.outputs.push_back(Output::Send(s));
    }

    fn unicast(&mut self, dst: PeerName, m: Message) {
        self.send(AppSend::Unicast {
            dst,
            payload: m.encode(),
        });
    }

    fn broadcast(&mut self) {
        self.send(AppSend::Broadcast {
            payload: Message::State(self.state()).encode(),
        });
    }

    fn flush(&mut self) {
        if self.dirty {
            self.dirty = false;
            let p = self.persisted();
            self.outputs.push_back(Output::Persist(p));
        }
    }

    /// What we gossip: the ring once there is one, else Paxos while electing, else a request.
    fn state(&self) -> State {
        let body = if !self.ring.is_empty() {
            let mut r = self.ring.clone();
            r.me = PeerName::UNKNOWN;
            Body::Ring(r)
        } else if let Some(node) = &self.paxos {
            Body::Paxos(node.knows.clone())
        } else {
            Body::Request
        };
        State {
            nicknames: self.nicknames.clone(),
            body,
        }
    }

    /// Whether we gossip our state: the ring once there is one; while there is none, electors
    /// gossip their Paxos claims (so a proposer knows every elector it may give a share to),
    /// observers nothing.
    fn gossips(&self) -> bool {
        !self.left && (!self.ring.is_empty() || self.paxos.is_some())
    }

    fn label(&self, p: PeerName) -> String {
        match self.nicknames.get(&p) {
            Some(n) => format!("{p}({n})"),
            None => p.to_string(),
        }
    }

    fn establish_ring(&mut self, now: Instant) {
        if !self.ring.is_empty() || self.left {
            return;
        }
        match self.config.init {
            InitMode::Consensus { .. } => {
                if !self.proposing {
                    self.proposing = true;
                    tracing::info!("IPAM: starting consensus");
                    self.propose(now);
                }
            }
            InitMode::Observer => self.broadcast(),
            InitMode::Seed(_) => {}
        }
    }

    fn propose(&mut self, now: Instant) {
        let Some(node) = &mut self.paxos else {
            return;
        };
        node.propose();
        node.think();
        match node.consensus() {
            Some(v) => self.create_ring(now, &v.value),
            None => self.broadcast(),
        }
    }

    fn create_ring(&mut self, now: Instant, peers: &[PeerName]) {
        self.ring.claim_for_peers(peers);
        if self.ring.is_empty() {
            return;
        }
        tracing::info!(peers = ?self.ring.seeds, "IPAM: ring created");
        self.paxos = None;
        self.proposing = false;
        self.sync_space();
        self.report_free();
        self.dirty = true;
        self.broadcast();
        self.retry(now, false);
    }

    /// Make the space own exactly what the ring says we own.
    fn sync_space(&mut self) {
        let ring = self.ring.owned_by(self.me);
        let space = self.space.owned_ranges();
        for (s, e) in subtract(&space, &ring) {
            if self.space.has_allocations_in(s, e) {
                tracing::warn!(from = %ip(s), to = %ip(e - 1), "IPAM: lost a range holding allocations");
            }
            self.space.remove(s, e);
        }
        for (s, e) in subtract(&ring, &space) {
            self.space.add(s, e);
            // Addresses we recorded earlier there (a restart, a transfer back) stay taken.
            for o in self.owned.values() {
                for c in &o.cidrs {
                    let a = u64::from(u32::from(c.addr));
                    if a >= s && a < e {
                        self.space.take(a);
                    }
                }
            }
        }
    }

    fn report_free(&mut self) {
        let space = &self.space;
        if self.ring.report_free(|s, e| space.free_in(s, e)) {
            self.dirty = true;
        }
    }

    fn holder(&self, addr: Ipv4Addr) -> Option<String> {
        self.owned
            .iter()
            .find(|(_, o)| o.cidrs.iter().any(|c| c.addr == addr))
            .map(|(k, _)| k.clone())
    }

    fn record(&mut self, ident: &str, cidr: Ipv4Cidr) {
        let (key, is_container) = if ident == ANONYMOUS {
            (cidr.addr.to_string(), false)
        } else {
            (ident.to_string(), looks_like_container(ident))
        };
        self.owned
            .entry(key.clone())
            .or_insert(Owned {
                is_container,
                cidrs: Vec::new(),
            })
            .cidrs
            .push(cidr);
        self.persist_ident(&key);
        self.dirty = true;
    }

    /// Bring `persist_owned`'s entry for `ident` in step with `owned`.
    fn persist_ident(&mut self, ident: &str) {
        let map = Arc::make_mut(&mut self.persist_owned);
        match self.owned.get(ident) {
            Some(o) => {
                map.insert(
                    ident.to_string(),
                    PersistedOwned {
                        is_container: o.is_container,
                        cidrs: o.cidrs.iter().map(ToString::to_string).collect(),
                    },
                );
            }
            None => {
                map.remove(ident);
            }
        }
    }

    /// Drop one address of `ident` from the records, and free it in our space.
    fn forget(&mut self, ident: &str, addr: Ipv4Addr) {
        if let Some(o) = self.owned.get_mut(ident) {
            o.cidrs.retain(|c| c.addr != addr);
            if o.cidrs.is_empty() {
                self.owned.remove(ident);
                self.dead.remove(ident);
            }
        }
        self.space.release(u64::from(u32::from(addr)));
        self.persist_ident(ident);
        self.dirty = true;
    }

    fn release_all(&mut self, ident: &str) {
        if let Some(o) = self.owned.remove(ident) {
            for c in o.cidrs {
                self.space.release(u64::from(u32::from(c.addr)));
            }
            self.persist_ident(ident);
            self.dirty = true;
        }
        self.dead.remove(ident);
    }

    fn after_release(&mut self, now: Instant) {
        self.report_free();
        self.retry(now, false);
        self.flush();
    }

    fn cancel_ident(&mut self, ident: &str) {
        let mut ids = Vec::new();
        self.claims.retain(|c| {
            if c.ident == ident {
                ids.extend(c.id);
                false
            } else {
                true
            }
        });
        self.allocs.retain(|a| {
            if a.ident == ident {
                ids.push(a.id);
                false
            } else {
                true
            }
        });
        for id in ids {
            self.reply(id, Err(IpamError::Cancelled));
        }
    }

    fn try_allocate(&mut self, now: Instant, p: &PendingAlloc) -> Step {
        if let Some(c) = self.lookup(&p.ident, Some(p.subnet)).first() {
            return Step::Done(Ok(Reply::Addr(*c)));
        }
        if self.ring.is_empty() {
            self.establish_ring(now);
            return Step::Wait;
        }
        let (lo, hi) = host_range(p.subnet);
        match self.space.allocate_lowest(lo, hi) {
            Some(a) => {
                let cidr = Ipv4Cidr {
                    addr: ip(a),
                    prefix_len: p.subnet.prefix_len,
                };
                self.record(&p.ident, cidr);
                self.report_free();
                Step::Done(Ok(Reply::Addr(cidr)))
            }
            None => Step::Wait,
        }
    }

    fn try_claim(&mut self, now: Instant, c: &mut PendingClaim, tick: bool) -> Step {
        if self.ring.is_empty() {
            self.establish_ring(now);
            return Step::Wait;
        }
        let addr = c.cidr.addr;
        let a = u64::from(u32::from(addr));
        let Some(owner) = self.ring.owner(a) else {
            return Step::Done(Err(IpamError::OutOfBounds {
                subnet: c.cidr,
                universe: self.config.universe,
            }));
        };
        if owner == self.me {
            if self.space.take(a) {
                self.record(&c.ident, c.cidr);
                self.report_free();
                return Step::Done(Ok(Reply::Done));
            }
            let anonymous_key = addr.to_string();
            return Step::Done(match self.holder(addr) {
                None => {
                    // Taken in the space but in nobody's records: ours to fix.
                    self.record(&c.ident, c.cidr);
                    Ok(Reply::Done)
                }
                Some(h) if h == c.ident => Ok(Reply::Done),
                Some(_) if c.ident == ANONYMOUS => Ok(Reply::Done),
                Some(h) if h == anonymous_key => Err(IpamError::InUse { addr }),
                Some(h) => Err(IpamError::OwnedBy { addr, ident: h }),
            });
        }
        if self.reachable.contains(&owner) {
            self.unicast(
                owner,
                Message::SpaceRequest {
                    start: a,
                    end: a + 1,
                },
            );
        } else if tick {
            c.tries += 1;
            if c.tries > CLAIM_TRIES && c.no_error_on_unknown {
                tracing::warn!(addr = %addr, owner = %self.label(owner), "IPAM: claim of an address owned by an unreachable peer: going ahead without it");
                return Step::Done(Ok(Reply::Done));
            }
            if c.tries > CLAIM_TRIES {
                return Step::Done(Err(IpamError::OwnerUnreachable {
                    addr,
                    peer: self.label(owner),
                    tries: c.tries,
                }));
            }
        }
        Step::Wait
    }

    /// Retry every pending request, primes then claims then allocates.
    fn retry(&mut self, now: Instant, tick: bool) {
        if !self.ring.is_empty() {
            for p in std::mem::take(&mut self.primes) {
                self.reply(p.id, Ok(Reply::Done));
            }
        }
        let mut keep = Vec::new();
        for mut c in std::mem::take(&mut self.claims) {
            match self.try_claim(now, &mut c, tick) {
                Step::Done(r) => match c.id {
                    Some(id) => self.reply(id, r),
                    None => {
                        if let Err(e) = r {
                            tracing::warn!(addr = %c.cidr, ident = c.ident, "IPAM: pre-claim failed: {e}");
                        }
                    }
                },
                Step::Wait => keep.push(c),
            }
        }
        // Claims that arrived while retrying (none today) go after the older ones.
        keep.append(&mut self.claims);
        self.claims = keep;
        let mut keep = Vec::new();
        let mut short: Vec<Ipv4Cidr> = Vec::new();
        for a in std::mem::take(&mut self.allocs) {
            match self.try_allocate(now, &a) {
                Step::Done(r) => self.reply(a.id, r),
                Step::Wait => {
                    if !short.contains(&a.subnet) {
                        short.push(a.subnet);
                    }
                    keep.push(a);
                }
            }
        }
        keep.append(&mut self.allocs);
        self.allocs = keep;
        if !self.ring.is_empty() {
            for subnet in short {
                self.ask_for_space(subnet);
            }
        }
    }

    /// Free addresses per other peer in `[lo, hi)`, as the ring reports them.
    fn donors(&self, lo: u64, hi: u64) -> BTreeMap<PeerName, u64> {
        let mut free: BTreeMap<PeerName, u64> = BTreeMap::new();
        for i in 0..self.ring.entries.len() {
            let e = self.ring.entries[i];
            if e.peer == self.me || e.free == 0 {
                continue;
            }
            if self
                .ring
                .ranges_of(i)
                .iter()
                .any(|&r| overlaps(r, (lo, hi)))
            {
                *free.entry(e.peer).or_default() += e.free;
            }
        }
        free
    }

    /// Ask one reachable peer with free space in `subnet` for some, chosen at random weighted
    /// by how much it has free.
    fn ask_for_space(&mut self, subnet: Ipv4Cidr) {
        let (lo, hi) = bounds(subnet);
        let (lo, hi) = (lo.max(self.ring.start), hi.min(self.ring.end));
        let mut best: Option<(f64, PeerName)> = None;
        for (peer, free) in self.donors(lo, hi) {
            if !self.reachable.contains(&peer) {
                continue;
            }
            let w = free as f64 * (f64::from(self.rng.next_u32()) / f64::from(u32::MAX));
            if best.is_none_or(|(bw, _)| w > bw) {
                best = Some((w, peer));
            }
        }
        if let Some((_, peer)) = best {
            tracing::debug!(donor = %self.label(peer), %subnet, "IPAM: asking for space");
            self.unicast(peer, Message::SpaceRequest { start: lo, end: hi });
        }
    }

    /// Fail the requests that waited too long, saying for what.
    fn expire(&mut self, now: Instant) {
        let timeout = self.config.request_timeout;
        let late = |since: Instant| now >= since + timeout;
        let mut failed: Vec<(RequestId, String)> = Vec::new();
        for p in std::mem::take(&mut self.primes) {
            if late(p.since) {
                failed.push((p.id, self.ring_wait_reason()));
            } else {
                self.primes.push(p);
            }
        }
        for c in std::mem::take(&mut self.claims) {
            match c.id {
                Some(id) if late(c.since) => {
                    let reason = self.claim_wait_reason(&c);
                    failed.push((id, reason));
                }
                _ => self.claims.push(c),
            }
        }
        for a in std::mem::take(&mut self.allocs) {
            if late(a.since) {
                failed.push((a.id, self.alloc_wait_reason(a.subnet)));
            } else {
                self.allocs.push(a);
            }
        }
        for (id, reason) in failed {
            tracing::warn!(request = id.0, "IPAM: request timed out: {reason}");
            self.reply(
                id,
                Err(IpamError::Timeout {
                    waited: timeout,
                    reason,
                }),
            );
        }
    }

    fn ring_wait_reason(&self) -> String {
        match (&self.config.init, &self.paxos) {
            (InitMode::Consensus { quorum }, Some(node)) => format!(
                "waiting for IPAM consensus: heard from {} of the {} peers needed (quorum {}); start weave on the other peers, or set --ipalloc-init",
                node.known_nodes(),
                quorum,
                quorum
            ),
            (InitMode::Observer, _) => format!(
                "waiting for the IP allocation ring: this peer is an observer (--ipalloc-init observer) and none of the {} reachable peers has sent one; start weave with a ring-holding peer, or set --ipalloc-init",
                self.reachable.len()
            ),
            _ => "waiting for the IP allocation ring".to_string(),
        }
    }

    fn alloc_wait_reason(&self, subnet: Ipv4Cidr) -> String {
        if self.ring.is_empty() {
            return self.ring_wait_reason();
        }
        let (lo, hi) = bounds(subnet);
        let donors = self.donors(lo, hi);
        let reachable: Vec<String> = donors
            .keys()
            .filter(|p| self.reachable.contains(p))
            .map(|p| self.label(*p))
            .collect();
        if donors.is_empty() {
            format!("no free IP addresses in {subnet}: every address there is allocated")
        } else if reachable.is_empty() {
            "all IP ranges are owned by unreachable peers - use 'weave rmpeer' if they are dead"
                .to_string()
        } else {
            format!(
                "waiting for IP space in {subnet} from {} (asked, no answer yet)",
                reachable.join(", ")
            )
        }
    }

    fn claim_wait_reason(&self, c: &PendingClaim) -> String {
        if self.ring.is_empty() {
            return self.ring_wait_reason();
        }
        match self.ring.owner(u64::from(u32::from(c.cidr.addr))) {
            Some(p) if !self.reachable.contains(&p) => format!(
                "address {} is owned by peer {}, which is unreachable - use 'weave rmpeer' if it is dead",
                c.cidr.addr,
                self.label(p)
            ),
            Some(p) => format!(
                "waiting for peer {}, which owns {}, to hand it over",
                self.label(p),
                c.cidr.addr
            ),
            None => "waiting for the IP allocation ring".to_string(),
        }
    }

    pub fn persisted(&self) -> Persisted {
        Persisted {
            version: PERSISTED_VERSION,
            peer_name: self.me.to_string(),
            range: self.config.universe.to_string(),
            ring: PersistedRing {
                entries: self
                    .ring
                    .entries
                    .iter()
                    .map(|e| PersistedEntry {
                        token: ip(e.token),
                        peer: e.peer.to_string(),
                        version: e.version,
                        free: e.free,
                    })
                    .collect(),
                seeds: self.ring.seeds.iter().map(ToString::to_string).collect(),
            },
            owned: self.persist_owned.clone(),
            nicknames: self
                .nicknames
                .iter()
                .map(|(p, n)| (p.to_string(), n.clone()))
                .collect(),
        }
    }

    pub fn status(&self) -> IpamStatus {
        let status = if self.ring.is_empty() {
            match (&self.config.init, &self.paxos) {
                (InitMode::Consensus { quorum }, Some(node))
                    if self.proposing || node.in_progress() =>
                {
                    format!(
                        "awaiting consensus (quorum: {quorum}, known: {})",
                        node.known_nodes()
                    )
                }
                (InitMode::Observer, _)
                    if !self.primes.is_empty()
                        || !self.claims.is_empty()
                        || !self.allocs.is_empty() =>
                {
                    "priming".to_string()
                }
                _ => "idle".to_string(),
            }
        } else if self.allocs.is_empty() {
            "ready".to_string()
        } else if self.allocs.iter().all(|a| {
            let (lo, hi) = bounds(a.subnet);
            let d = self.donors(lo, hi);
            !d.is_empty() && d.keys().all(|p| !self.reachable.contains(p))
        }) {
            STATUS_UNREACHABLE.to_string()
        } else {
            "waiting for IP(s) to become available".to_string()
        };
        let paxos = match (&self.config.init, &self.paxos) {
            (InitMode::Consensus { quorum }, Some(node)) if self.ring.is_empty() => {
                Some(PaxosStatus {
                    elector: true,
                    known_nodes: node.known_nodes(),
                    quorum: *quorum,
                })
            }
            _ => None,
        };
        IpamStatus {
            status,
            paxos,
            range: self.config.universe.to_string(),
            range_num_ips: self.ring.end - self.ring.start,
            active_ips: self.space.allocated(),
            default_subnet: self.config.default_subnet.to_string(),
            entries: (0..self.ring.entries.len())
                .map(|i| {
                    let e = self.ring.entries[i];
                    EntryStatus {
                        token: ip(e.token).to_string(),
                        size: self.ring.size_of(i),
                        peer: e.peer.to_string(),
                        nickname: self.nicknames.get(&e.peer).cloned().unwrap_or_default(),
                        is_known_peer: e.peer == self.me || self.reachable.contains(&e.peer),
                        version: e.version,
                    }
                })
                .collect(),
            pending_claims: self
                .claims
                .iter()
                .map(|c| ClaimStatus {
                    ident: c.ident.clone(),
                    cidr: c.cidr.to_string(),
                })
                .collect(),
            pending_allocates: self
                .allocs
                .iter()
                .map(|a| format!("{} {}", a.ident, a.subnet))
                .collect(),
        }
    }

    // ---- for tests and the property checks ----

    pub fn me(&self) -> PeerName {
        self.me
    }

    pub fn uid(&self) -> u64 {
        self.uid
    }

    pub fn nickname(&self) -> &str {
        &self.nickname
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// The ring's invariants hold and the space covers exactly our ranges, with every recorded
    /// in-range address we own taken.
    pub fn check(&self) -> Result<(), String> {
        self.ring.check_invariants().map_err(|e| e.to_string())?;
        if self.space.owned_ranges() != self.ring.owned_by(self.me) {
            return Err(format!(
                "space {:?} != ring's ranges for us {:?}",
                self.space.owned_ranges(),
                self.ring.owned_by(self.me)
            ));
        }
        for o in self.owned.values() {
            for c in &o.cidrs {
                let a = u64::from(u32::from(c.addr));
                if self.space.owns(a) && self.space.is_free(a) {
                    return Err(format!("{c} recorded but free"));
                }
            }
        }
        let fresh: BTreeMap<String, PersistedOwned> = self
            .owned
            .iter()
            .map(|(k, o)| {
                let p = PersistedOwned {
                    is_container: o.is_container,
                    cidrs: o.cidrs.iter().map(ToString::to_string).collect(),
                };
                (k.clone(), p)
            })
            .collect();
        if *self.persist_owned != fresh {
            return Err("the persisted owned map is out of step".into());
        }
        Ok(())
    }
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}
