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
            data_plane: false,
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
                self.establish(from, (to, to_life));
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
    fn establish(&mut self, from: (usize, u64), to: (usize, u64)) {
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

    /// Every running node knows the same peers at the same versions and reaches exactly the
    /// other running nodes over gossip routes. (Entries of stopped or cut-off peers may stay:
    /// the topology's GC keeps peers reachable over a connection reported in either direction.)
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
        up.iter().all(|n| {
            let mut reached: BTreeSet<PeerName> = n.routes().unicast_all.keys().copied().collect();
            reached.insert(n.me());
            reached == names && fingerprint(n) == reference
        })
    }

    /// `weave connect`: node `i` adds node `j` to its direct peers (and dials it).
    pub fn connect(&mut self, i: usize, j: usize) {
        let Some(addr) = self.hosts.get(j).map(|h| h.addr) else {
            return;
        };
        let now = self.now;
        self.with_node(i, |n| {
            n.connect(
                now,
                vec![DirectPeer {
                    spec: addr.ip().to_string(),
                    addr,
                    port_given: false,
                }],
                false,
            );
        });
    }

    /// Something outside the simulation changed what host `i`'s applications want to send:
    /// poll them.
    pub fn touch(&mut self, i: usize) {
        self.dirty.insert(i);
    }

    /// Connections the simulation carries now.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::app::{AppSend, GossipKind, PeerInfo};
    use std::cell::RefCell;
    use std::collections::VecDeque;
    use std::rc::Rc;

    const LIMIT: Duration = Duration::from_secs(120);
    const STEP: Duration = Duration::from_millis(100);

    /// `n` nodes, each launched with the previous one as its peer (a chain).
    fn chain(n: usize, seed: u64) -> SimNet {
        let mut net = SimNet::new(
            n,
            SimConfig {
                seed,
                ..SimConfig::default()
            },
        );
        for i in 1..n {
            net.set_peers(i, vec![i - 1]);
        }
        net
    }

    fn converge(net: &mut SimNet, what: &str) -> Duration {
        let t0 = net.elapsed();
        assert!(
            net.run_until_cond(LIMIT, STEP, SimNet::converged),
            "{what}: no convergence by {:?}: {net:?}",
            net.elapsed()
        );
        net.elapsed() - t0
    }

    #[test]
    fn topology_converges_on_3_and_10_nodes() {
        for n in [3, 10] {
            let mut net = chain(n, 7);
            net.start_all();
            assert!(!net.converged(), "each knows only itself");
            let took = converge(&mut net, &format!("{n} nodes"));
            assert!(took < Duration::from_secs(10), "{n} nodes took {took:?}");
            // Discovery: every node ends up connected to every other.
            let done = net.run_until_cond(LIMIT, STEP, |net| {
                (0..n).all(|i| {
                    net.node(i)
                        .is_some_and(|node| node.connections().len() == n - 1)
                })
            });
            assert!(done, "full mesh of {n}");
            assert!(net.converged());
            assert!(net.traffic().bytes > 0);
        }
    }

    #[test]
    fn same_seed_same_run() {
        let run = |seed| {
            let mut net = chain(6, seed);
            net.set_loss(0.05);
            net.start_all();
            net.run_for(Duration::from_secs(20));
            (net.traffic().clone(), net.connection_count())
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3).0, run(4).0);
    }

    #[test]
    fn partition_then_heal() {
        let mut net = chain(6, 11);
        net.start_all();
        converge(&mut net, "start");
        let (left, right) = ([0, 1, 2], [3, 4, 5]);
        net.partition(&left, &right);
        let apart = net.run_until_cond(LIMIT, STEP, |net| {
            left.iter().all(|&i| {
                net.node(i).is_some_and(|n| {
                    right
                        .iter()
                        .all(|&j| !n.routes().unicast_all.contains_key(&net.name(j)))
                })
            })
        });
        assert!(apart, "the sides lose each other");
        assert!(!net.converged());
        // Still apart a while later (dials across fail).
        net.run_for(Duration::from_secs(20));
        assert!(!net.converged());
        net.heal();
        converge(&mut net, "heal");
        assert_eq!(net.node(0).map(|n| n.topology().len()), Some(6));
    }

    #[test]
    fn loss_is_repaired() {
        let mut net = chain(8, 5);
        net.set_loss(0.2);
        net.start_all();
        converge(&mut net, "20% loss");
        assert!(net.traffic().lost > 0);
    }

    #[test]
    fn restarted_node_rejoins_with_a_new_uid() {
        let mut net = chain(5, 13);
        net.start_all();
        converge(&mut net, "start");
        let old_uid = net.node(2).map(|n| n.config().uid);
        net.stop(2);
        assert!(!net.is_up(2));
        converge(&mut net, "without node 2");
        assert!(net
            .node(0)
            .is_some_and(|n| n.routes().next_hop_gossip(net.name(2)).is_none()));
        net.start(2, None);
        let new_uid = net.node(2).map(|n| n.config().uid);
        assert_ne!(old_uid, new_uid);
        converge(&mut net, "node 2 back");
        let uid_seen = net
            .node(4)
            .and_then(|n| n.topology().get(net.name(2)).map(|p| p.uid.0));
        assert_eq!(uid_seen, new_uid);
    }

    /// What a toy application saw.
    #[derive(Debug, Default)]
    struct ToyLog {
        got: Vec<(GossipKind, PeerName, Vec<u8>)>,
        peers: Vec<PeerInfo>,
    }

    /// Logs what it gets, relays neighbour gossip that is new to it, sends what the test queues.
    struct Toy {
        log: Rc<RefCell<ToyLog>>,
        outbox: Rc<RefCell<VecDeque<AppSend>>>,
        seen: BTreeSet<Vec<u8>>,
        relay: VecDeque<AppSend>,
    }

    impl App for Toy {
        fn channel(&self) -> &'static str {
            "toy"
        }

        fn on_event(&mut self, _now: Instant, event: AppEvent) -> Result<(), String> {
            match event {
                AppEvent::Gossip {
                    kind, src, payload, ..
                } => {
                    if payload == b"poison" {
                        return Err("poisoned".into());
                    }
                    if kind == GossipKind::Neighbours && self.seen.insert(payload.clone()) {
                        self.relay.push_back(AppSend::Neighbours {
                            payload: payload.clone(),
                        });
                    }
                    self.log.borrow_mut().got.push((kind, src, payload));
                }
                AppEvent::Peers(p) => self.log.borrow_mut().peers = p,
            }
            Ok(())
        }

        fn handle_timeout(&mut self, _now: Instant) {}

        fn poll_timeout(&self) -> Option<Instant> {
            None
        }

        fn poll_send(&mut self) -> Option<AppSend> {
            self.relay
                .pop_front()
                .or_else(|| self.outbox.borrow_mut().pop_front())
        }
    }

    type Handles = Vec<(Rc<RefCell<ToyLog>>, Rc<RefCell<VecDeque<AppSend>>>)>;

    fn with_toys(net: &mut SimNet) -> Handles {
        (0..net.len())
            .map(|i| {
                let log = Rc::new(RefCell::new(ToyLog::default()));
                let outbox = Rc::new(RefCell::new(VecDeque::new()));
                net.add_app(
                    i,
                    Box::new(Toy {
                        log: log.clone(),
                        outbox: outbox.clone(),
                        seen: BTreeSet::new(),
                        relay: VecDeque::new(),
                    }),
                );
                (log, outbox)
            })
            .collect()
    }

    #[test]
    fn toy_app_broadcast_unicast_neighbours() {
        let n = 10;
        let mut net = chain(n, 21);
        // Uneven latencies: delivery must not depend on them.
        for i in 1..n {
            net.set_latency(i - 1, i, Duration::from_millis(1 + 3 * i as u64));
        }
        let toys = with_toys(&mut net);
        net.start_all();
        converge(&mut net, "toys");
        for (log, _) in &toys {
            let log = log.borrow();
            assert_eq!(log.peers.len(), n, "{:?}", log.peers);
            assert!(log.peers.iter().all(|p| p.reachable));
        }
        for (i, (_, outbox)) in toys.iter().enumerate() {
            let mut o = outbox.borrow_mut();
            o.push_back(AppSend::Broadcast {
                payload: format!("b{i}").into_bytes(),
            });
            o.push_back(AppSend::Unicast {
                dst: net.name((i + 1) % n),
                payload: format!("u{i}").into_bytes(),
            });
        }
        toys[0].1.borrow_mut().push_back(AppSend::Neighbours {
            payload: b"n0".to_vec(),
        });
        for i in 0..n {
            net.touch(i);
        }
        net.run_for(Duration::from_secs(5));
        for (i, (log, _)) in toys.iter().enumerate() {
            let log = log.borrow();
            let mut broadcasts: Vec<String> = log
                .got
                .iter()
                .filter(|g| g.0 == GossipKind::Broadcast)
                .map(|g| String::from_utf8_lossy(&g.2).into_owned())
                .collect();
            broadcasts.sort();
            let mut want: Vec<String> = (0..n)
                .filter(|&j| j != i)
                .map(|j| format!("b{j}"))
                .collect();
            want.sort();
            assert_eq!(
                broadcasts, want,
                "node {i}: each broadcast once, none of its own"
            );
            let from = (i + n - 1) % n;
            let unicasts: Vec<_> = log
                .got
                .iter()
                .filter(|g| g.0 == GossipKind::Unicast)
                .collect();
            assert_eq!(unicasts.len(), 1, "node {i}: {unicasts:?}");
            assert_eq!(unicasts[0].1, net.name(from));
            assert_eq!(unicasts[0].2, format!("u{from}").into_bytes());
            if i != 0 {
                assert!(
                    log.got
                        .iter()
                        .any(|g| g.0 == GossipKind::Neighbours && g.2 == b"n0"),
                    "node {i} got the neighbour gossip"
                );
            }
        }
        // A bad payload: the receiver drops the connection that delivered it.
        let before = net.node(1).map(Node::terminations);
        let victim = net.name(0);
        assert!(net
            .node(1)
            .is_some_and(|n| n.connections().contains_key(&victim)));
        toys[0].1.borrow_mut().push_back(AppSend::Unicast {
            dst: net.name(1),
            payload: b"poison".to_vec(),
        });
        net.touch(0);
        net.run_for(Duration::from_millis(50));
        assert_eq!(net.node(1).map(Node::terminations), before.map(|b| b + 1));
    }
}
