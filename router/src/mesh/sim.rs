//! A simulated mesh: N [`Node`]s in virtual time (quinn-proto's test `Pair`, generalised), for
//! tests and benches of the topology and of the applications riding the gossip.
//!
//! Virtual time is an [`Instant`] base plus offsets; nothing sleeps. Links have a latency
//! (default, or per pair), messages may be lost at random (modelling the shell's drops of
//! messages on full queues: periodic gossip must repair them), pairs of nodes may be partitioned
//! and healed, and nodes stopped and restarted (a new UID, the same name). Connections skip TCP
//! and the handshake: a dial succeeds after one latency if the target is up and reachable.
//! Messages travel as [`Message`] values; the bytes they would take on the wire are counted
//! ([`SimNet::bytes`]). Everything is deterministic from the seed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use rand_core::RngCore;

use super::app::{App, AppEvent};
use super::conn::Message;
use super::connmaker::DirectPeer;
use super::node::{Event, NewConn, Node, NodeConfig};
use super::peer::{Peer, PeerName, PeerUid};

/// A small seeded RNG (SplitMix64): deterministic, fast, good enough for simulations. Not for
/// keys.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    pub fn new(seed: u64) -> Self {
        SimRng(seed)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

impl RngCore for SimRng {
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(v.get(..chunk.len()).unwrap_or_default());
        }
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

/// Bytes a message takes on the wire: the 4-byte frame length, the tag, the fields, the
/// payload, and the 16-byte tag of an encrypted frame.
pub fn wire_size(msg: &Message) -> usize {
    const FRAME: usize = 4 + 16;
    FRAME
        + match msg {
            Message::Heartbeat | Message::Unknown(_) => 1,
            Message::Gossip {
                channel, payload, ..
            }
            | Message::GossipBroadcast {
                channel, payload, ..
            } => 1 + 1 + channel.len() + 6 + payload.len(),
            Message::GossipUnicast {
                channel, payload, ..
            } => 1 + 1 + channel.len() + 12 + payload.len(),
            Message::OverlayControl { body, .. } => 2 + body.len(),
        }
}

/// What went over the simulated wires.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Traffic {
    pub messages: u64,
    pub bytes: u64,
    /// Bytes by gossip channel.
    pub by_channel: BTreeMap<String, u64>,
    /// Messages lost on the way.
    pub lost: u64,
}

/// How the nodes of a [`SimNet`] are set up.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    /// Latency of every link without its own.
    pub latency: Duration,
    /// Probability that a message is lost.
    pub loss: f64,
    /// Applied to every node's configuration (connection limit, discovery, gossip timing).
    pub conn_limit: usize,
    pub discovery: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: 1,
            latency: Duration::from_millis(5),
            loss: 0.0,
            conn_limit: 0,
            discovery: true,
        }
    }
}

struct Host {
    name: PeerName,
    addr: SocketAddr,
    /// Indexes of the hosts it is given as peers at start.
    initial: Vec<usize>,
    node: Option<Node>,
    apps: Vec<Box<dyn App>>,
    /// Bumped at every (re)start: events for an earlier life are dropped.
    life: u64,
    /// The node's and its applications' next deadline, cached (recomputed when touched).
    deadline: Option<Instant>,
}

struct SimConn {
    /// The dialler and the dialled, with their lives.
    ends: [(usize, u64); 2],
}

enum SimEvent {
    /// A dial reaches its target (or fails to).
    Dial {
        from: (usize, u64),
        to: usize,
        addr: SocketAddr,
    },
    DialFailed {
        host: (usize, u64),
        addr: SocketAddr,
        error: String,
    },
    Deliver {
        conn: u64,
        to: (usize, u64),
        from: PeerName,
        msg: Message,
    },
    Closed {
        conn: u64,
        host: (usize, u64),
        peer: PeerName,
        error: String,
    },
}

/// The simulated network.
pub struct SimNet {
    config: SimConfig,
    rng: SimRng,
    base: Instant,
    now: Instant,
    hosts: Vec<Host>,
    by_addr: BTreeMap<SocketAddr, usize>,
    link_latency: BTreeMap<(usize, usize), Duration>,
    /// Pairs (lower index first) that cannot reach each other.
    blocked: BTreeSet<(usize, usize)>,
    conns: BTreeMap<u64, SimConn>,
    next_conn: u64,
    queue: BTreeMap<(Instant, u64), SimEvent>,
    seq: u64,
    dirty: BTreeSet<usize>,
    traffic: Traffic,
}

impl std::fmt::Debug for SimNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimNet")
            .field("now", &self.elapsed())
            .field("hosts", &self.hosts.len())
            .field("conns", &self.conns.len())
            .finish_non_exhaustive()
    }
}

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

impl SimNet {
    /// `n` nodes, none started yet (give peers with [`set_peers`](Self::set_peers), then
    /// [`start`](Self::start)).
    pub fn new(n: usize, config: SimConfig) -> Self {
        let base = Instant::now();
        let mut hosts = Vec::with_capacity(n);
        let mut by_addr = BTreeMap::new();
        for i in 0..n {
            let k = i as u32 + 1;
            let ip = Ipv4Addr::from(0x0a00_0000 | k);
            let addr = SocketAddr::from((ip, 6783));
            by_addr.insert(addr, i);
            hosts.push(Host {
                name: PeerName::from_u64(0x0200_0000_0000 | u64::from(k)),
                addr,
                initial: Vec::new(),
                node: None,
                apps: Vec::new(),
                life: 0,
                deadline: None,
            });
        }
        SimNet {
            rng: SimRng::new(config.seed),
            config,
            base,
            now: base,
            hosts,
            by_addr,
            link_latency: BTreeMap::new(),
            blocked: BTreeSet::new(),
            conns: BTreeMap::new(),
            next_conn: 1,
            queue: BTreeMap::new(),
            seq: 0,
            dirty: BTreeSet::new(),
            traffic: Traffic::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    pub fn now(&self) -> Instant {
        self.now
    }

    /// Virtual time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now.saturating_duration_since(self.base)
    }

    pub fn name(&self, i: usize) -> PeerName {
        self.hosts.get(i).map_or_else(PeerName::default, |h| h.name)
    }

    pub fn node(&self, i: usize) -> Option<&Node> {
        self.hosts.get(i).and_then(|h| h.node.as_ref())
    }

    pub fn traffic(&self) -> &Traffic {
        &self.traffic
    }

    /// The peers host `i` is launched with.
    pub fn set_peers(&mut self, i: usize, peers: Vec<usize>) {
        if let Some(h) = self.hosts.get_mut(i) {
            h.initial = peers;
        }
    }

    pub fn set_latency(&mut self, a: usize, b: usize, latency: Duration) {
        self.link_latency.insert(pair(a, b), latency);
    }

    pub fn set_loss(&mut self, loss: f64) {
        self.config.loss = loss;
    }

    /// Host an application on node `i` (registered now if the node runs, else at its start).
    pub fn add_app(&mut self, i: usize, app: Box<dyn App>) {
        let Some(h) = self.hosts.get_mut(i) else {
            return;
        };
        if let Some(node) = h.node.as_mut() {
            node.register_channel(app.channel());
        }
        h.apps.push(app);
        self.dirty.insert(i);
    }

    /// Start (or restart) node `i`: a new UID, the same name and launch peers. Its applications
    /// are replaced by `apps` when given.
    pub fn start(&mut self, i: usize, apps: Option<Vec<Box<dyn App>>>) {
        if self.hosts.get(i).is_some_and(|h| h.node.is_some()) {
            self.stop(i);
        }
        let uid = self.rng.next_u64() | 1;
        let seed = self.rng.next_u64();
        let initial: Vec<DirectPeer> = self
            .hosts
            .get(i)
            .map(|h| h.initial.clone())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|j| self.hosts.get(j))
            .map(|t| DirectPeer {
                spec: t.addr.ip().to_string(),
                addr: t.addr,
                port_given: false,
            })
            .collect();
        let (conn_limit, discovery) = (self.config.conn_limit, self.config.discovery);
        let now = self.now;
        let Some(h) = self.hosts.get_mut(i) else {
            return;
        };
        let config = NodeConfig {
            conn_limit,
            discovery,
            ..NodeConfig::new(h.name, format!("sim{i}"), uid)
        };
        let mut node = Node::new(config, initial, Box::new(SimRng::new(seed)), now);
        if let Some(apps) = apps {
            h.apps = apps;
        }
        for app in &h.apps {
            node.register_channel(app.channel());
        }
        h.node = Some(node);
        h.life += 1;
        self.dirty.insert(i);
    }

    /// Start every node.
    pub fn start_all(&mut self) {
        for i in 0..self.hosts.len() {
            self.start(i, None);
        }
    }

    /// Stop node `i`: its neighbours see their connections close after one latency.
    pub fn stop(&mut self, i: usize) {
        let Some(h) = self.hosts.get_mut(i) else {
            return;
        };
        if h.node.take().is_none() {
            return;
        }
        h.deadline = None;
        let name = h.name;
        let gone: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.ends.iter().any(|e| e.0 == i))
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            if let Some(c) = self.conns.remove(&id) {
                for end in c.ends.into_iter().filter(|e| e.0 != i) {
                    let at = self.now + self.latency(i, end.0);
                    self.schedule(
                        at,
                        SimEvent::Closed {
                            conn: id,
                            host: end,
                            peer: name,
                            error: "connection closed by the remote".into(),
                        },
                    );
                }
            }
        }
    }

    pub fn is_up(&self, i: usize) -> bool {
        self.hosts.get(i).is_some_and(|h| h.node.is_some())
    }

    /// Cut every link between `a` and `b` (both sides' connections close at once, as after a
    /// heartbeat timeout) and refuse dials across.
    pub fn partition(&mut self, a: &[usize], b: &[usize]) {
        for &x in a {
            for &y in b {
                if x != y {
                    self.blocked.insert(pair(x, y));
                }
            }
        }
        let cut: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| self.blocked.contains(&pair(c.ends[0].0, c.ends[1].0)))
            .map(|(id, _)| *id)
            .collect();
        for id in cut {
            if let Some(c) = self.conns.remove(&id) {
                for (end, other) in [(c.ends[0], c.ends[1]), (c.ends[1], c.ends[0])] {
                    let peer = self.name(other.0);
                    self.schedule(
                        self.now,
                        SimEvent::Closed {
                            conn: id,
                            host: end,
                            peer,
                            error: "partitioned".into(),
                        },
                    );
                }
            }
        }
    }

    /// Undo every partition.
    pub fn heal(&mut self) {
        self.blocked.clear();
    }

    fn latency(&self, a: usize, b: usize) -> Duration {
        self.link_latency
            .get(&pair(a, b))
            .copied()
            .unwrap_or(self.config.latency)
    }

    fn schedule(&mut self, at: Instant, ev: SimEvent) {
        self.seq += 1;
        self.queue.insert((at, self.seq), ev);
    }

    fn alive(&self, (i, life): (usize, u64)) -> bool {
        self.hosts
            .get(i)
            .is_some_and(|h| h.life == life && h.node.is_some())
    }

    /// Run until virtual time `until`.
    pub fn run_until(&mut self, until: Instant) {
        loop {
            self.pump();
            let next_event = self.queue.keys().next().map(|k| k.0);
            let next_timer = self.hosts.iter().filter_map(|h| h.deadline).min();
            let next = match (next_event, next_timer) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => match a.or(b) {
                    Some(t) => t,
                    None => break,
                },
            };
            if next > until {
                break;
            }
            self.now = self.now.max(next);
            let now = self.now;
            while let Some(entry) = self.queue.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                let ev = entry.remove();
                self.on_event(ev);
            }
            for i in 0..self.hosts.len() {
                let Some(h) = self.hosts.get_mut(i) else {
                    continue;
                };
                if h.deadline.is_some_and(|d| d <= now) {
                    if let Some(node) = h.node.as_mut() {
                        node.handle_timeout(now);
                    }
                    for app in &mut h.apps {
                        if app.poll_timeout().is_some_and(|t| t <= now) {
                            app.handle_timeout(now);
                        }
                    }
                    self.dirty.insert(i);
                }
            }
        }
        self.now = self.now.max(until);
    }

    /// Run for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.run_until(until);
    }

    /// Run until `cond` holds (checked every `step`) or `limit` passed; returns whether it held.
    pub fn run_until_cond(
        &mut self,
        limit: Duration,
        step: Duration,
        mut cond: impl FnMut(&SimNet) -> bool,
    ) -> bool {
        let end = self.now + limit;
        loop {
            if cond(self) {
                return true;
            }
            if self.now >= end {
                return false;
            }
            let next = (self.now + step).min(end);
            self.run_until(next);
        }
    }

    fn on_event(&mut self, ev: SimEvent) {
        let now = self.now;
        match ev {
            SimEvent::Dial { from, to, addr } => {
                if !self.alive(from) {
                    return;
                }
                let reachable = !self.blocked.contains(&pair(from.0, to));
                let Some(to_life) = self
                    .hosts
                    .get(to)
                    .filter(|h| h.node.is_some() && reachable)
                    .map(|h| h.life)
                else {
                    let error = if reachable {
                        format!("dial tcp4 {addr}: connect: connection refused")
                    } else {
                        format!("dial tcp4 {addr}: i/o timeout")
                    };
                    self.with_node(from.0, |n| n.attempt_failed(now, addr, error, false));
                    return;
                };
                self.connect(from, (to, to_life));
            }
            SimEvent::DialFailed { host, addr, error } => {
                if self.alive(host) {
                    self.with_node(host.0, |n| n.attempt_failed(now, addr, error, false));
                }
            }
            SimEvent::Deliver {
                conn,
                to,
                from,
                msg,
            } => {
                if self.conns.contains_key(&conn) && self.alive(to) {
                    self.with_node(to.0, |n| n.received(now, conn, from, msg));
                }
            }
            SimEvent::Closed {
                conn,
                host,
                peer,
                error,
            } => {
                if self.alive(host) {
                    self.with_node(host.0, |n| n.closed(now, conn, peer, Some(error)));
                }
            }
        }
    }

    fn with_node(&mut self, i: usize, f: impl FnOnce(&mut Node)) {
        if let Some(node) = self.hosts.get_mut(i).and_then(|h| h.node.as_mut()) {
            f(node);
            self.dirty.insert(i);
        }
    }

    /// Both handshakes done: register the connection at both ends.
    fn connect(&mut self, from: (usize, u64), to: (usize, u64)) {
        let now = self.now;
        let id = self.next_conn;
        self.next_conn += 1;
        let conn_uid = self.rng.next_u64();
        let ephemeral = 32768 + (id % 28_000) as u16;
        let peer_of = |net: &SimNet, i: usize| -> Option<Peer> {
            net.node(i).map(|n| Peer {
                name: n.me(),
                nickname: n.config().nickname.clone(),
                uid: PeerUid(n.config().uid),
                version: 0,
            })
        };
        let (Some(p_from), Some(p_to)) = (peer_of(self, from.0), peer_of(self, to.0)) else {
            return;
        };
        let to_addr = self.hosts.get(to.0).map(|h| h.addr);
        let from_ip = self.hosts.get(from.0).map(|h| h.addr.ip());
        let (Some(to_addr), Some(from_ip)) = (to_addr, from_ip) else {
            return;
        };
        let conn = |remote: Peer, addr: SocketAddr, outbound: bool| NewConn {
            id,
            remote,
            addr,
            outbound,
            conn_uid,
            udp_encrypted: false,
            keys: None,
        };
        let mut ok = [false; 2];
        if let Some(n) = self.hosts.get_mut(from.0).and_then(|h| h.node.as_mut()) {
            ok[0] = n.register(now, conn(p_to, to_addr, true)).is_ok();
        }
        if let Some(n) = self.hosts.get_mut(to.0).and_then(|h| h.node.as_mut()) {
            let seen = SocketAddr::new(from_ip, ephemeral);
            ok[1] = n.register(now, conn(p_from.clone(), seen, false)).is_ok();
        }
        self.dirty.insert(from.0);
        self.dirty.insert(to.0);
        match ok {
            [true, true] => {
                self.conns.insert(id, SimConn { ends: [from, to] });
            }
            [true, false] | [false, true] => {
                // The refusing end closes its side; the other hears of it one latency later.
                let (end, other) = if ok[0] { (from, to) } else { (to, from) };
                let at = now + self.latency(from.0, to.0);
                let peer = self.name(other.0);
                self.schedule(
                    at,
                    SimEvent::Closed {
                        conn: id,
                        host: end,
                        peer,
                        error: "connection closed by the remote".into(),
                    },
                );
            }
            [false, false] => {}
        }
    }

    /// Drain every touched node's outputs and its applications, until nothing moves.
    fn pump(&mut self) {
        while let Some(i) = self.dirty.pop_first() {
            self.pump_host(i);
        }
    }

    fn pump_host(&mut self, i: usize) {
        let now = self.now;
        loop {
            let mut outputs = Vec::new();
            let mut moved = false;
            {
                let Some(h) = self.hosts.get_mut(i) else {
                    return;
                };
                let Some(node) = h.node.as_mut() else {
                    h.deadline = None;
                    return;
                };
                while let Some(ev) = node.poll_event() {
                    outputs.push(Err(ev));
                }
                while let Some(t) = node.poll_transmit() {
                    outputs.push(Ok(t));
                }
                while let Some((channel, ev)) = node.poll_app() {
                    let from = match &ev {
                        AppEvent::Gossip { from, .. } => Some(*from),
                        AppEvent::Peers(_) => None,
                    };
                    if let Some(app) = h.apps.iter_mut().find(|a| a.channel() == channel) {
                        if let Err(reason) = app.on_event(now, ev) {
                            if let Some(from) = from {
                                node.reject(now, from, reason);
                            }
                        }
                    }
                    moved = true;
                }
                for app in &mut h.apps {
                    while let Some(send) = app.poll_send() {
                        node.app_send(now, app.channel(), send);
                        moved = true;
                    }
                }
                let mut deadline = node.poll_timeout();
                for app in &h.apps {
                    if let Some(t) = app.poll_timeout() {
                        deadline = deadline.min(t);
                    }
                }
                h.deadline = Some(deadline);
            }
            moved |= !outputs.is_empty();
            let me = self.name(i);
            for out in outputs {
                match out {
                    Err(ev) => self.on_node_event(i, ev),
                    Ok((to, msg)) => self.transmit(i, me, to, msg),
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn on_node_event(&mut self, i: usize, ev: Event) {
        let life = self.hosts.get(i).map_or(0, |h| h.life);
        match ev {
            Event::Dial(addr) => match self.by_addr.get(&addr).copied() {
                Some(to) => {
                    let at = self.now + self.latency(i, to);
                    self.schedule(
                        at,
                        SimEvent::Dial {
                            from: (i, life),
                            to,
                            addr,
                        },
                    );
                }
                None => {
                    let at = self.now + self.config.latency;
                    self.schedule(
                        at,
                        SimEvent::DialFailed {
                            host: (i, life),
                            addr,
                            error: format!("dial tcp4 {addr}: i/o timeout"),
                        },
                    );
                }
            },
            // The node ended it: the other end hears after one latency.
            Event::Close {
                id,
                reason: Some(reason),
                ..
            } => {
                if let Some(c) = self.conns.remove(&id) {
                    if let Some(&other) = c.ends.iter().find(|e| e.0 != i) {
                        let at = self.now + self.latency(i, other.0);
                        let peer = self.name(i);
                        self.schedule(
                            at,
                            SimEvent::Closed {
                                conn: id,
                                host: other,
                                peer,
                                error: reason,
                            },
                        );
                    }
                }
            }
            Event::Close {
                id, reason: None, ..
            } => {
                // Already gone on the wire (closed by the other end, or cut).
                self.conns.remove(&id);
            }
            Event::ViewChanged => {}
        }
    }

    fn transmit(&mut self, i: usize, me: PeerName, to: PeerName, msg: Message) {
        let Some(id) = self.node(i).and_then(|n| n.conn_id(to)) else {
            return;
        };
        let Some(other) = self
            .conns
            .get(&id)
            .and_then(|c| c.ends.iter().find(|e| e.0 != i).copied())
        else {
            return;
        };
        let size = wire_size(&msg) as u64;
        self.traffic.messages += 1;
        self.traffic.bytes += size;
        if let Some((channel, _)) = msg.gossip() {
            *self
                .traffic
                .by_channel
                .entry(channel.to_string())
                .or_default() += size;
        }
        if self.rng.chance(self.config.loss) {
            self.traffic.lost += 1;
            return;
        }
        let at = self.now + self.latency(i, other.0);
        self.schedule(
            at,
            SimEvent::Deliver {
                conn: id,
                to: other,
                from: me,
                msg,
            },
        );
    }

    /// Every running node knows the same peers at the same versions, those are exactly the
    /// running nodes, and each reaches every other over gossip routes.
    pub fn converged(&self) -> bool {
        let up: Vec<&Node> = self.hosts.iter().filter_map(|h| h.node.as_ref()).collect();
        let names: BTreeSet<PeerName> = up.iter().map(|n| n.me()).collect();
        let fingerprint = |n: &Node| -> Vec<(PeerName, u64, u64)> {
            n.topology()
                .peers()
                .map(|p| (p.name, p.uid.0, p.version))
                .collect()
        };
        let Some(first) = up.first() else {
            return true;
        };
        let reference = fingerprint(first);
        let known: BTreeSet<PeerName> = reference.iter().map(|p| p.0).collect();
        known == names
            && up.iter().all(|n| {
                fingerprint(n) == reference && n.routes().unicast_all.len() + 1 == names.len()
            })
    }

    /// Connections the simulation carries now.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }
}
