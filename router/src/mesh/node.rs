//! The mesh node (spec §2.1, §3): everything a router decides about its peers, as a sans-IO
//! state machine. It owns the topology (behind its [`GossipChannel`]), the routes, the
//! [`ConnectionMaker`], the registry of live connections and the application channels; it
//! resolves duplicate connections, enforces the connection limit, waits for the overlay, fans
//! gossip out, relays channels it does not run (surrogate) and routes unicasts and broadcasts.
//!
//! Inputs take `now`; the RNG is injected; outputs are polled: [`Node::poll_transmit`] (a
//! message for a neighbour), [`Node::poll_event`] (dial, close, data-plane view changed),
//! [`Node::poll_app`] (events for the application channels). [`Node::poll_timeout`] is the one
//! deadline. The router shell drives it over TCP on tokio's clock; [`super::sim`] drives many in
//! virtual time.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand_core::RngCore;
use serde_json::{json, Value};

use super::app::{AppEvent, AppSend, GossipKind, PeerInfo};
use super::conn::{Message, UdpKeys};
use super::connmaker::{ConnMakerConfig, ConnectionMaker, DirectPeer, TargetState};
use super::gossip::{
    choose_neighbours, gossip_fanout, GossipAction, GossipChannel, SurrogateFilter,
    GOSSIP_INTERVAL, MAX_GOSSIP_PAYLOAD, ON_CHANGE_DELAY,
};
use super::handshake::{resolve_duplicate, DuplicateResolution};
use super::peer::{Peer, PeerName, PeerUid};
use super::routes::{LinkFilter, RouteTable, Routes};
use super::topology::{ConnSummary, Topology};
use crate::status::{
    BroadcastRoute, ConnectionState, ConnectionStatus, PeerConnection, PeerStatus, UnicastRoute,
};

/// The topology gossip channel.
pub const TOPOLOGY_CHANNEL: &str = "topology";
/// The overlay every connection uses.
pub const OVERLAY: &str = "sleeve";
/// Why a connection whose forwarder heard no heartbeat for 60 s is torn down (spec §4.7).
pub const UDP_HEARTBEAT_TIMEOUT: &str = "timed out waiting for UDP heartbeat";

/// What a node needs to know about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Our peer name (the bridge MAC).
    pub name: PeerName,
    pub nickname: String,
    /// Random non-zero UID chosen at start.
    pub uid: u64,
    /// Our mesh port (discovered peers are assumed to listen on it too).
    pub port: u16,
    pub discovery: bool,
    /// 0 = unlimited.
    pub conn_limit: usize,
    /// A mesh password is set (status only: encryption is the connections' business).
    pub encrypted: bool,
    /// Connections stay `pending` until the data plane reports their forwarder established
    /// ([`Node::overlay`]); `false`: established as soon as they are added.
    pub await_overlay: bool,
    /// Compute the data-plane routes ([`DataPlaneView::routes`]): a BFS per source peer on
    /// every topology change. Off where nothing forwards frames (the simulated network).
    pub data_plane: bool,
    /// Full topology to random neighbours this often, and local changes coalesced this long.
    pub gossip_interval: Duration,
    pub gossip_delay: Duration,
}

impl NodeConfig {
    /// Defaults for everything but the identity.
    pub fn new(name: PeerName, nickname: impl Into<String>, uid: u64) -> Self {
        NodeConfig {
            name,
            nickname: nickname.into(),
            uid,
            port: 6783,
            discovery: true,
            conn_limit: 0,
            encrypted: false,
            await_overlay: false,
            data_plane: true,
            gossip_interval: GOSSIP_INTERVAL,
            gossip_delay: ON_CHANGE_DELAY,
        }
    }
}

/// One live connection, as the data plane needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerLink {
    /// Remote TCP address (its IP is where the sleeve sends UDP).
    pub addr: SocketAddr,
    pub outbound: bool,
    /// Identifies this connection (a new one to the same peer replaces the forwarder).
    pub conn_uid: u64,
    /// False without a password or when both ends trust each other.
    pub udp_encrypted: bool,
    /// The latest UDP keys (password mode): epoch 0's, then each rekey's.
    pub keys: Option<UdpKeys>,
}

/// What the data plane follows (the shell publishes it on a `watch`: latest wins).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataPlaneView {
    /// Connections added to the local peer (established or still pending), by remote peer.
    pub peers: BTreeMap<PeerName, PeerLink>,
    /// Data-plane routes over established, symmetric links.
    pub routes: RouteTable,
}

/// What the data plane says about the forwarder of one peer connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OverlayPeer {
    /// The connection the forwarder belongs to (reports about other connections are ignored).
    pub conn_uid: u64,
    /// Heartbeats confirmed both ways.
    pub established: bool,
    /// Effective overlay MTU (`mtu=N` in `weave status connections`).
    pub mtu: u16,
    /// No heartbeat for 60 s.
    pub timed_out: bool,
    /// UDP key epoch sent on, epoch switches, datagrams dropped for their epoch (encrypted).
    pub udp_epoch: u32,
    pub udp_key_switches: u64,
    pub udp_key_drops: u64,
}

/// The data plane's forwarders, by peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverlayStatus {
    pub peers: BTreeMap<PeerName, OverlayPeer>,
}

/// A connection whose handshake completed, offered to the node.
#[derive(Debug, Clone)]
pub struct NewConn {
    /// The shell's identifier of the connection (later inputs and outputs name it).
    pub id: u64,
    pub remote: Peer,
    pub addr: SocketAddr,
    pub outbound: bool,
    pub conn_uid: u64,
    /// UDP encrypted (a password, and not both ends trusting each other).
    pub udp_encrypted: bool,
    pub keys: Option<UdpKeys>,
}

/// What the node asks of its shell besides sending messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Dial this address (report the outcome with [`Node::attempt_failed`] or
    /// [`Node::register`]).
    Dial(SocketAddr),
    /// Connection `id` to `peer` is no longer the node's: drop its queue. With a reason, the
    /// node ended it (duplicate, heartbeat timeout, rejected by an application): close it.
    Close {
        peer: PeerName,
        id: u64,
        reason: Option<String>,
    },
    /// [`Node::view`] changed.
    ViewChanged,
}

/// A connection registered with the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    pub id: u64,
    pub addr: SocketAddr,
    pub outbound: bool,
    pub conn_uid: u64,
    /// UDP encrypted (a password, and not both ends trusting each other).
    pub udp_encrypted: bool,
    pub nickname: String,
    pub established: bool,
    /// The data plane's latest report on this connection's forwarder.
    pub overlay: Option<OverlayPeer>,
}

/// The router part of the status the node knows (the shell adds its configuration).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeStatus {
    pub peers: Vec<PeerStatus>,
    pub unicast_routes: Vec<UnicastRoute>,
    pub broadcast_routes: Vec<BroadcastRoute>,
    pub connections: Vec<ConnectionStatus>,
    pub targets: Vec<String>,
    pub termination_count: u64,
}

/// Lends the boxed RNG to the generic helpers.
struct Rng<'a>(&'a mut (dyn RngCore + Send));

impl RngCore for Rng<'_> {
    fn next_u32(&mut self) -> u32 {
        self.0.next_u32()
    }
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.0.fill_bytes(dest);
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.0.try_fill_bytes(dest)
    }
}

/// The mesh node.
pub struct Node {
    config: NodeConfig,
    rng: Box<dyn RngCore + Send>,
    gossip: GossipChannel<Topology>,
    routes: Routes,
    maker: ConnectionMaker,
    conns: BTreeMap<PeerName, Live>,
    surrogate: SurrogateFilter,
    terminations: u64,
    /// When the connection maker last ran: a target due before then and still waiting is held
    /// back by the connection limit, and only an event (which runs it again) can release it.
    last_tick: Instant,
    /// Something the connection maker's choice depends on changed (direct peers, connections,
    /// an attempt's outcome) since it last ran. Topology changes and due targets also run it;
    /// nothing else does, as its pass is linear in the topology.
    maker_dirty: bool,
    view: DataPlaneView,
    /// Application channels, and the peer list they last got.
    channels: BTreeSet<&'static str>,
    peers_seen: Option<Vec<PeerInfo>>,
    transmits: VecDeque<(PeerName, Message)>,
    events: VecDeque<Event>,
    app_events: VecDeque<(&'static str, AppEvent)>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.config.name)
            .field("conns", &self.conns.len())
            .field("peers", &self.gossip.data().len())
            .finish_non_exhaustive()
    }
}

impl Node {
    /// A node knowing only itself, to dial `initial` (resolved launch peers).
    pub fn new(
        config: NodeConfig,
        initial: Vec<DirectPeer>,
        rng: Box<dyn RngCore + Send>,
        now: Instant,
    ) -> Self {
        let me = Peer {
            name: config.name,
            nickname: config.nickname.clone(),
            uid: PeerUid(config.uid),
            version: 0,
        };
        let mut topo = Topology::new(&me);
        topo.set_local_short_id((config.uid >> 52) as u16);
        let routes = Routes::compute(&topo);
        let mut maker = ConnectionMaker::new(
            ConnMakerConfig {
                port: config.port,
                discovery: config.discovery,
                conn_limit: config.conn_limit,
            },
            config.name,
        );
        maker.connect(now, initial, false);
        let gossip = GossipChannel::with_timing(
            TOPOLOGY_CHANNEL,
            topo,
            now,
            config.gossip_interval,
            config.gossip_delay,
        );
        let mut node = Node {
            config,
            rng,
            gossip,
            routes,
            maker,
            conns: BTreeMap::new(),
            surrogate: SurrogateFilter::default(),
            terminations: 0,
            last_tick: now,
            maker_dirty: true,
            view: DataPlaneView::default(),
            channels: BTreeSet::new(),
            peers_seen: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            app_events: VecDeque::new(),
        };
        node.after_event(now);
        node
    }

    pub fn me(&self) -> PeerName {
        self.config.name
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    pub fn topology(&self) -> &Topology {
        self.gossip.data()
    }

    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    /// Live connections by remote peer.
    pub fn connections(&self) -> &BTreeMap<PeerName, Live> {
        &self.conns
    }

    /// Connections ended since the start.
    pub fn terminations(&self) -> u64 {
        self.terminations
    }

    /// The shell's identifier of the connection to `peer`, where messages for it go.
    pub fn conn_id(&self, peer: PeerName) -> Option<u64> {
        self.conns.get(&peer).map(|l| l.id)
    }

    pub fn view(&self) -> &DataPlaneView {
        &self.view
    }

    /// `weave connect [--replace]`.
    pub fn connect(&mut self, now: Instant, peers: Vec<DirectPeer>, replace: bool) {
        self.maker.connect(now, peers, replace);
        self.maker_dirty = true;
        self.after_event(now);
    }

    /// `weave forget`.
    pub fn forget(&mut self, now: Instant, specs: &[String]) {
        self.maker.forget(specs);
        self.maker_dirty = true;
        self.after_event(now);
    }

    /// A dial or handshake to `addr` failed.
    pub fn attempt_failed(
        &mut self,
        now: Instant,
        addr: SocketAddr,
        error: String,
        permanent: bool,
    ) {
        self.maker
            .on_attempt_failed(now, addr, error, permanent, &mut Rng(&mut *self.rng));
        self.maker_dirty = true;
        self.after_event(now);
    }

    /// A connection completed its handshake. `Err`: refused (duplicate, connection limit) with
    /// the reason, for the connection's log line; the shell closes it.
    pub fn register(&mut self, now: Instant, conn: NewConn) -> Result<(), String> {
        let result = self.add(now, conn);
        self.maker_dirty = true;
        self.after_event(now);
        result
    }

    fn add(&mut self, now: Instant, conn: NewConn) -> Result<(), String> {
        let name = conn.remote.name;
        let refuse = |node: &mut Node, reason: String| {
            if conn.outbound {
                node.maker.on_attempt_failed(
                    now,
                    conn.addr,
                    reason.clone(),
                    false,
                    &mut Rng(&mut *node.rng),
                );
            }
            Err(reason)
        };
        if let Some(existing) = self.conns.get(&name) {
            let dup = format!(
                "Multiple connections to {}({}) added to {}({})",
                name, conn.remote.nickname, self.config.name, self.config.nickname
            );
            match resolve_duplicate(existing.conn_uid, conn.conn_uid) {
                DuplicateResolution::KeepExisting => return refuse(self, dup),
                DuplicateResolution::KeepNew => {
                    self.remove(now, name, Some(dup.clone()), true);
                }
                DuplicateResolution::DropBoth => {
                    self.remove(now, name, Some(dup.clone()), true);
                    return refuse(self, dup);
                }
            }
        }
        if !self.maker.under_limit() {
            let reason = format!("Connection limit reached ({})", self.config.conn_limit);
            return refuse(self, reason);
        }
        self.gossip.data_mut().add_local_conn(ConnSummary {
            remote: name,
            addr: conn.addr.to_string(),
            outbound: conn.outbound,
            established: false,
        });
        self.gossip.notify_changed(now);
        self.maker.on_connected(name, conn.addr, conn.outbound);
        self.conns.insert(
            name,
            Live {
                id: conn.id,
                addr: conn.addr,
                outbound: conn.outbound,
                conn_uid: conn.conn_uid,
                udp_encrypted: conn.udp_encrypted,
                nickname: conn.remote.nickname.clone(),
                established: false,
                overlay: None,
            },
        );
        let full = self.gossip.full_state_message(self.me());
        self.transmits.push_back((name, full));
        if !self.config.await_overlay {
            // No data plane to wait for: established as soon as it is added.
            self.establish(now, name);
        }
        self.view.peers.insert(
            name,
            PeerLink {
                addr: conn.addr,
                outbound: conn.outbound,
                conn_uid: conn.conn_uid,
                udp_encrypted: conn.udp_encrypted,
                keys: conn.keys,
            },
        );
        self.events.push_back(Event::ViewChanged);
        Ok(())
    }

    /// Connection `id` to `remote` rekeyed its UDP keys.
    pub fn udp_keys(&mut self, id: u64, remote: PeerName, keys: UdpKeys) {
        if self.conns.get(&remote).is_some_and(|l| l.id == id) {
            if let Some(link) = self.view.peers.get_mut(&remote) {
                link.keys = Some(keys);
                self.events.push_back(Event::ViewChanged);
            }
        }
    }

    /// A message from neighbour `from` on connection `id`.
    pub fn received(&mut self, now: Instant, id: u64, from: PeerName, msg: Message) {
        if self.conns.get(&from).is_some_and(|l| l.id == id) {
            self.on_message(now, from, msg);
            self.after_event(now);
        }
    }

    /// Connection `id` to `remote` ended (`error`: why, `None`: closed by us).
    pub fn closed(&mut self, now: Instant, id: u64, remote: PeerName, error: Option<String>) {
        if self.conns.get(&remote).is_some_and(|l| l.id == id) {
            self.remove(now, remote, error, false);
            self.after_event(now);
        }
    }

    /// Send an overlay control message to the neighbour `to` (dropped if not connected).
    pub fn send_overlay(&mut self, to: PeerName, index: u8, body: Vec<u8>) {
        if self.conns.contains_key(&to) {
            self.transmits
                .push_back((to, Message::OverlayControl { index, body }));
        }
    }

    /// The data plane's view of its forwarders (spec §4.7): a pending connection becomes
    /// established once the forwarder of the same connection UID is; a connection whose
    /// forwarder timed out is torn down (and its target retried). Reports about other connection
    /// UIDs (the forwarder of an earlier connection, or one not created yet) are ignored.
    pub fn overlay(&mut self, now: Instant, status: &OverlayStatus) {
        let mut established = Vec::new();
        let mut timed_out = Vec::new();
        for (name, live) in &mut self.conns {
            let report = status
                .peers
                .get(name)
                .filter(|p| p.conn_uid == live.conn_uid)
                .copied();
            live.overlay = report;
            if !self.config.await_overlay {
                continue;
            }
            match report {
                Some(p) if p.timed_out => timed_out.push(*name),
                Some(p) if p.established && !live.established => established.push(*name),
                _ => {}
            }
        }
        for name in established {
            self.establish(now, name);
        }
        for name in timed_out {
            self.remove(now, name, Some(UDP_HEARTBEAT_TIMEOUT.to_string()), true);
        }
        self.after_event(now);
    }

    /// Mark the connection to `name` established: topology version bump (gossiped, routes
    /// recomputed after this event), and the connection maker's target.
    fn establish(&mut self, now: Instant, name: PeerName) {
        let Some(live) = self.conns.get_mut(&name) else {
            return;
        };
        live.established = true;
        tracing::info!(
            "{}[{}|{name}({})]: connection fully established",
            arrow(live.outbound),
            live.addr,
            live.nickname
        );
        if self.gossip.data_mut().set_local_established(name) {
            self.gossip.notify_changed(now);
        }
        self.maker.on_established(name);
    }

    /// Drop the connection to `remote`; `close`: the node ends it (the shell must close it).
    fn remove(&mut self, now: Instant, remote: PeerName, error: Option<String>, close: bool) {
        let Some(live) = self.conns.remove(&remote) else {
            return;
        };
        self.events.push_back(Event::Close {
            peer: remote,
            id: live.id,
            reason: if close { error.clone() } else { None },
        });
        self.terminations += 1;
        if self.gossip.data_mut().remove_local_conn(remote) {
            self.gossip.notify_changed(now);
        }
        self.maker
            .on_disconnected(now, remote, error, false, &mut Rng(&mut *self.rng));
        self.maker_dirty = true;
        if self.view.peers.remove(&remote).is_some() {
            self.events.push_back(Event::ViewChanged);
        }
    }

    /// Timers that are due: gossip, dials.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.after_event(now);
    }

    /// When [`handle_timeout`](Self::handle_timeout) wants to run next.
    pub fn poll_timeout(&self) -> Instant {
        let gossip = self.gossip.poll_timeout();
        match self.maker.poll_timeout().filter(|t| *t > self.last_tick) {
            Some(t) => t.min(gossip),
            None => gossip,
        }
    }

    pub fn poll_transmit(&mut self) -> Option<(PeerName, Message)> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next event for an application channel.
    pub fn poll_app(&mut self) -> Option<(&'static str, AppEvent)> {
        self.app_events.pop_front()
    }

    /// Run an application on `channel`: its gossip is delivered through
    /// [`poll_app`](Self::poll_app) from now on (no longer relayed as surrogate), starting with
    /// the peer list.
    pub fn register_channel(&mut self, channel: &'static str) {
        self.channels.insert(channel);
        let peers = self.peer_infos();
        self.app_events.push_back((channel, AppEvent::Peers(peers)));
    }

    /// Stop delivering `channel` (its gossip is relayed as surrogate again).
    pub fn unregister_channel(&mut self, channel: &str) {
        self.channels.remove(channel);
        self.app_events.retain(|(c, _)| *c != channel);
    }

    /// Send on an application channel.
    pub fn app_send(&mut self, now: Instant, channel: &'static str, send: AppSend) {
        let me = self.me();
        let len = match &send {
            AppSend::Unicast { payload, .. }
            | AppSend::Broadcast { payload }
            | AppSend::Neighbours { payload } => payload.len(),
        };
        if len > MAX_GOSSIP_PAYLOAD {
            // Every receiver would drop it.
            tracing::warn!(channel, len, "dropping oversized application gossip");
            return;
        }
        match send {
            AppSend::Unicast { dst, payload } => {
                if dst == me {
                    tracing::debug!(channel, "application unicast to ourselves dropped");
                    return;
                }
                match self.routes.next_hop_gossip(dst) {
                    Some(hop) => self.transmits.push_back((
                        hop,
                        Message::GossipUnicast {
                            channel: channel.to_string(),
                            src: me,
                            dst,
                            payload,
                        },
                    )),
                    None => tracing::debug!(channel, %dst, "no route: unicast dropped"),
                }
            }
            AppSend::Broadcast { payload } => {
                let msg = Message::GossipBroadcast {
                    channel: channel.to_string(),
                    src: me,
                    payload,
                };
                self.relay_broadcast(me, &msg);
            }
            AppSend::Neighbours { payload } => {
                let msg = Message::Gossip {
                    channel: channel.to_string(),
                    src: me,
                    payload,
                };
                self.spread(&msg, None);
            }
        }
        self.after_event(now);
    }

    /// An application found what `peer` delivered bad: drop that connection (logged).
    pub fn reject(&mut self, now: Instant, peer: PeerName, reason: String) {
        if let Some(live) = self.conns.get(&peer) {
            tracing::warn!(
                "{}[{}|{peer}({})]: connection shutting down due to error: {reason}",
                arrow(live.outbound),
                live.addr,
                live.nickname
            );
            self.remove(now, peer, Some(reason), true);
            self.after_event(now);
        }
    }

    /// Every known peer (placeholders excluded), us included, with reachability over gossip
    /// routes.
    pub fn peer_infos(&self) -> Vec<PeerInfo> {
        let me = self.me();
        self.gossip
            .data()
            .peers()
            .filter(|p| p.uid.0 != 0)
            .map(|p| PeerInfo {
                name: p.name,
                nickname: p.nickname.clone(),
                reachable: p.name == me || self.routes.unicast_all.contains_key(&p.name),
            })
            .collect()
    }

    /// Timers, topology changes, dials, after every event.
    fn after_event(&mut self, now: Instant) {
        let changes = self.gossip.data_mut().take_changes();
        let topology_changed = !changes.is_empty();
        if topology_changed {
            self.routes = Routes::compute(self.gossip.data());
            // GC removes the peers we cannot reach even over connections reported the other
            // way round; when our routes reach every peer there are none (and removing
            // unreachable peers would not change the routes).
            if self.routes.unicast_all.len() + 1 < self.gossip.data().len() {
                let keep: BTreeSet<PeerName> = self.conns.keys().copied().collect();
                for gone in self.gossip.data_mut().gc(&keep) {
                    tracing::info!("Removed unreachable peer {}({})", gone.name, gone.nickname);
                }
            }
            if self.config.data_plane {
                let table = RouteTable::compute(self.gossip.data());
                if self.view.routes != table {
                    self.view.routes = table;
                    self.events.push_back(Event::ViewChanged);
                }
            }
            if !self.channels.is_empty() {
                let peers = self.peer_infos();
                if self.peers_seen.as_ref() != Some(&peers) {
                    for c in &self.channels {
                        self.app_events
                            .push_back((c, AppEvent::Peers(peers.clone())));
                    }
                    self.peers_seen = Some(peers);
                }
            }
        }
        for action in self.gossip.handle_timeout(now) {
            let GossipAction::Gossip { payload, exclude } = action;
            let msg = self.gossip.message(self.me(), payload);
            self.spread(&msg, exclude);
        }
        let due = self.maker.poll_timeout().is_some_and(|t| t <= now);
        if !(topology_changed || self.maker_dirty || due) {
            return;
        }
        self.maker_dirty = false;
        self.last_tick = now;
        for addr in self.maker.tick(now, self.gossip.data()) {
            tracing::debug!(%addr, "dialling");
            self.events.push_back(Event::Dial(addr));
        }
    }

    /// Send to random neighbours (spec §3.4).
    fn spread(&mut self, msg: &Message, exclude: Option<PeerName>) {
        let weights: BTreeMap<PeerName, u32> =
            self.routes.neighbour_weights().into_iter().collect();
        let candidates: Vec<(PeerName, u32)> = self
            .conns
            .keys()
            .map(|n| (*n, weights.get(n).copied().unwrap_or(1)))
            .collect();
        let count = gossip_fanout(self.gossip.data().len(), candidates.len());
        for n in choose_neighbours(&candidates, count, exclude, &mut Rng(&mut *self.rng)) {
            self.transmits.push_back((n, msg.clone()));
        }
    }

    /// Forward a broadcast from `src` along its tree.
    fn relay_broadcast(&mut self, src: PeerName, msg: &Message) {
        let hops: Vec<PeerName> = self
            .routes
            .broadcast(self.gossip.data(), src, LinkFilter::All)
            .to_vec();
        for hop in hops {
            if self.conns.contains_key(&hop) {
                self.transmits.push_back((hop, msg.clone()));
            }
        }
    }

    fn registered(&self, channel: &str) -> Option<&'static str> {
        self.channels.get(channel).copied()
    }

    fn on_message(&mut self, now: Instant, from: PeerName, msg: Message) {
        let me = self.me();
        match msg {
            Message::Gossip {
                channel, payload, ..
            } if channel == TOPOLOGY_CHANNEL => match self.gossip.on_gossip(now, from, &payload) {
                Ok(Some(GossipAction::Gossip { payload, exclude })) => {
                    let msg = self.gossip.message(me, payload);
                    self.spread(&msg, exclude);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(%from, error = %e, "bad topology gossip"),
            },
            Message::Gossip {
                channel,
                src,
                payload,
            } => {
                if let Some(c) = self.registered(&channel) {
                    // The application relays what was new to it.
                    self.app_events.push_back((
                        c,
                        AppEvent::Gossip {
                            kind: GossipKind::Neighbours,
                            src,
                            from,
                            payload,
                        },
                    ));
                } else if self.surrogate.should_relay(now, &channel, &payload) {
                    // A channel we do not run: relay it (surrogate, spec §3.1).
                    let msg = Message::Gossip {
                        channel,
                        src: me,
                        payload,
                    };
                    self.spread(&msg, Some(from));
                }
            }
            Message::GossipUnicast {
                channel,
                src,
                dst,
                payload,
            } if dst == me => match self.registered(&channel) {
                Some(c) => self.app_events.push_back((
                    c,
                    AppEvent::Gossip {
                        kind: GossipKind::Unicast,
                        src,
                        from,
                        payload,
                    },
                )),
                None => tracing::debug!(%from, "unicast gossip for a channel we do not run"),
            },
            msg @ Message::GossipUnicast { dst, .. } => {
                if let Some(hop) = self.routes.next_hop_gossip(dst) {
                    self.transmits.push_back((hop, msg));
                }
            }
            Message::GossipBroadcast {
                channel,
                src,
                payload,
            } => {
                let registered = self.registered(&channel);
                let msg = Message::GossipBroadcast {
                    channel,
                    src,
                    payload,
                };
                self.relay_broadcast(src, &msg);
                if let (Some(c), Message::GossipBroadcast { payload, .. }) = (registered, msg) {
                    self.app_events.push_back((
                        c,
                        AppEvent::Gossip {
                            kind: GossipKind::Broadcast,
                            src,
                            from,
                            payload,
                        },
                    ));
                }
            }
            Message::OverlayControl { index, body } => {
                // The sleeve needs none (it probes PMTU over UDP); Weave's fastdp would.
                tracing::debug!(%from, index, len = body.len(), "overlay control message ignored");
            }
            Message::Heartbeat | Message::Unknown(_) => {}
        }
    }

    /// The router part of the status. `wall` is the wall clock at `now` (for retry times).
    pub fn status(&mut self, now: Instant, wall: SystemTime) -> NodeStatus {
        let connections = self.connection_statuses(now, wall);
        let peers = peer_statuses(self.gossip.data());
        let unicast_routes = self
            .routes
            .unicast
            .iter()
            .map(|(dest, via)| UnicastRoute {
                dest: dest.to_string(),
                via: via.to_string(),
            })
            .collect();
        let mut sources: Vec<PeerName> = self.routes.unicast.keys().copied().collect();
        sources.insert(0, self.me());
        let broadcast_routes = sources
            .into_iter()
            .map(|src| BroadcastRoute {
                source: src.to_string(),
                via: self
                    .routes
                    .broadcast(self.gossip.data(), src, LinkFilter::EstablishedSymmetric)
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
            })
            .collect();
        NodeStatus {
            peers,
            unicast_routes,
            broadcast_routes,
            connections,
            targets: self.maker.direct_peers(false),
            termination_count: self.terminations,
        }
    }

    fn connection_statuses(&self, now: Instant, wall: SystemTime) -> Vec<ConnectionStatus> {
        let password = self.config.encrypted;
        let mut out: Vec<ConnectionStatus> = self
            .conns
            .iter()
            .map(|(name, l)| live_status(*name, l, password))
            .collect();
        let live_addrs: BTreeSet<SocketAddr> = self.conns.values().map(|l| l.addr).collect();
        for t in self.maker.targets() {
            if live_addrs.contains(&t.addr) {
                continue;
            }
            let (state, info) = match (&t.state, &t.last_error) {
                (TargetState::Attempting, Some(e)) => (ConnectionState::Retrying, e.clone()),
                (TargetState::Attempting, None) => (ConnectionState::Connecting, String::new()),
                (TargetState::Waiting, Some(e)) => {
                    let at = wall + t.next_try.saturating_duration_since(now);
                    (
                        ConnectionState::Failed,
                        format!("{e}, retry: {}", go_time(at)),
                    )
                }
                (TargetState::Waiting, None) => (ConnectionState::Connecting, String::new()),
                (TargetState::Never, e) => (ConnectionState::Failed, e.clone().unwrap_or_default()),
                (TargetState::Suspended | TargetState::Connected { .. }, _) => continue,
            };
            out.push(ConnectionStatus {
                address: t.addr.to_string(),
                outbound: true,
                state,
                info,
                attrs: None,
            });
        }
        out
    }
}

/// `->` for outbound connections, `<-` for inbound ones (log lines).
pub fn arrow(outbound: bool) -> &'static str {
    if outbound {
        "->"
    } else {
        "<-"
    }
}

/// `weave status connections` for a live connection (spec §6.2). With a password, Info and the
/// `encrypted` attribute tell whether the data path (UDP) is encrypted: it is not between peers
/// that trust each other (`--trusted-subnets`), while TCP always is. `mtu` is the forwarder's
/// effective MTU, once the data plane has reported on this connection.
fn live_status(name: PeerName, l: &Live, password: bool) -> ConnectionStatus {
    let mut info = String::new();
    let mut attrs = BTreeMap::from([("name".to_string(), json!(OVERLAY))]);
    if password {
        let enc = if l.udp_encrypted {
            "encrypted"
        } else {
            "unencrypted"
        };
        let _ = write!(info, "{enc:<11} ");
        attrs.insert("encrypted".to_string(), Value::Bool(l.udp_encrypted));
    }
    let _ = write!(info, "{OVERLAY:<6} {name}({})", l.nickname);
    if let Some(o) = &l.overlay {
        attrs.insert("mtu".to_string(), json!(o.mtu));
        if l.udp_encrypted {
            attrs.insert("udp_epoch".to_string(), json!(o.udp_epoch));
            attrs.insert("udp_key_switches".to_string(), json!(o.udp_key_switches));
            attrs.insert("udp_key_drops".to_string(), json!(o.udp_key_drops));
        }
    }
    ConnectionStatus {
        address: l.addr.to_string(),
        outbound: l.outbound,
        state: if l.established {
            ConnectionState::Established
        } else {
            ConnectionState::Pending
        },
        info,
        attrs: Some(attrs),
    }
}

/// Every known peer (ourselves first), with its gossiped connections.
fn peer_statuses(topo: &Topology) -> Vec<PeerStatus> {
    let nick = |n: PeerName| topo.get(n).map(|p| p.nickname.clone()).unwrap_or_default();
    let mut out: Vec<PeerStatus> = topo
        .peers()
        .filter(|p| p.uid.0 != 0)
        .map(|p| PeerStatus {
            name: p.name.to_string(),
            nickname: p.nickname.clone(),
            uid: p.uid.0,
            short_id: p.short_id.unwrap_or(0),
            version: p.version,
            connections: p
                .conns
                .iter()
                .map(|c| PeerConnection {
                    name: c.remote.to_string(),
                    nickname: nick(c.remote),
                    address: c.addr.clone(),
                    outbound: c.outbound,
                    established: c.established,
                })
                .collect(),
        })
        .collect();
    let me = topo.me().to_string();
    if let Some(i) = out.iter().position(|p| p.name == me) {
        let mine = out.remove(i);
        out.insert(0, mine);
    }
    out
}

/// Go's `time.Time.String()` for UTC: `2015-08-06 18:55:38 +0000 UTC`.
fn go_time(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} +0000 UTC",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 → (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::sim::SimRng;
    use crate::status::StatusSnapshot;

    fn peer(n: u64) -> Peer {
        Peer {
            name: PeerName::from_u64(n),
            nickname: format!("n{n}"),
            uid: PeerUid(n + 100),
            version: 0,
        }
    }

    fn node_with(n: u64, f: impl FnOnce(&mut NodeConfig)) -> Node {
        let mut c = NodeConfig::new(PeerName::from_u64(n), format!("n{n}"), n + 100);
        f(&mut c);
        Node::new(c, Vec::new(), Box::new(SimRng::new(n)), Instant::now())
    }

    fn new_conn(id: u64, n: u64, outbound: bool, conn_uid: u64) -> NewConn {
        NewConn {
            id,
            remote: peer(n),
            addr: format!("10.0.0.{n}:6783").parse().expect("addr"),
            outbound,
            conn_uid,
            udp_encrypted: false,
            keys: None,
        }
    }

    fn transmits(node: &mut Node) -> Vec<(PeerName, Message)> {
        std::iter::from_fn(|| node.poll_transmit()).collect()
    }

    fn events(node: &mut Node) -> Vec<Event> {
        std::iter::from_fn(|| node.poll_event()).collect()
    }

    fn apps(node: &mut Node) -> Vec<(&'static str, AppEvent)> {
        std::iter::from_fn(|| node.poll_app()).collect()
    }

    fn name(n: u64) -> PeerName {
        PeerName::from_u64(n)
    }

    #[test]
    fn registration_duplicates_and_limit() {
        let t0 = Instant::now();
        let mut a = node_with(1, |c| c.conn_limit = 2);
        a.register(t0, new_conn(10, 2, true, 50)).expect("added");
        // Our full state goes to the new neighbour; established at once without a data plane.
        let tx = transmits(&mut a);
        assert!(
            matches!(&tx[..], [(to, Message::Gossip { channel, .. })] if *to == name(2) && channel == TOPOLOGY_CHANNEL)
        );
        assert!(a.connections()[&name(2)].established);
        assert!(events(&mut a).contains(&Event::ViewChanged));
        assert_eq!(a.conn_id(name(2)), Some(10));
        // A duplicate with a higher connection UID loses; a lower one replaces the existing.
        let dup = a.register(t0, new_conn(11, 2, false, 60)).expect_err("dup");
        assert!(dup.starts_with("Multiple connections to"), "{dup}");
        a.register(t0, new_conn(12, 2, false, 40))
            .expect("replaces");
        let ev = events(&mut a);
        assert!(ev.iter().any(|e| matches!(e, Event::Close { id: 10, reason: Some(r), .. } if r.starts_with("Multiple"))), "{ev:?}");
        assert_eq!(a.conn_id(name(2)), Some(12));
        // Equal UIDs: both go.
        assert!(a.register(t0, new_conn(13, 2, false, 40)).is_err());
        assert_eq!(a.conn_id(name(2)), None);
        assert!(events(&mut a)
            .iter()
            .any(|e| matches!(e, Event::Close { id: 12, .. })));
        // The limit.
        a.register(t0, new_conn(14, 3, false, 1)).expect("3");
        a.register(t0, new_conn(15, 4, false, 1)).expect("4");
        let err = a
            .register(t0, new_conn(16, 5, false, 1))
            .expect_err("limit");
        assert_eq!(err, "Connection limit reached (2)");
        // A connection closed by its task: no close request back, the view follows.
        a.closed(t0, 14, name(3), Some("EOF".into()));
        let ev = events(&mut a);
        assert!(
            ev.contains(&Event::Close {
                peer: name(3),
                id: 14,
                reason: None
            }),
            "{ev:?}"
        );
        assert!(!a.view().peers.contains_key(&name(3)));
        // A stale id changes nothing.
        a.closed(t0, 99, name(4), None);
        assert_eq!(a.conn_id(name(4)), Some(15));
        assert_eq!(a.status(t0, SystemTime::now()).termination_count, 3);
    }

    #[test]
    fn overlay_gates_establishment() {
        let t0 = Instant::now();
        let mut a = node_with(1, |c| c.await_overlay = true);
        a.register(t0, new_conn(10, 2, true, 50)).expect("added");
        assert!(!a.connections()[&name(2)].established);
        let report = |uid, established, timed_out| OverlayStatus {
            peers: BTreeMap::from([(
                name(2),
                OverlayPeer {
                    conn_uid: uid,
                    established,
                    timed_out,
                    mtu: 1400,
                    ..OverlayPeer::default()
                },
            )]),
        };
        a.overlay(t0, &report(51, true, false));
        assert!(
            !a.connections()[&name(2)].established,
            "another connection's report"
        );
        a.overlay(t0, &report(50, true, false));
        assert!(a.connections()[&name(2)].established);
        events(&mut a);
        a.overlay(t0, &report(50, true, true));
        assert_eq!(a.conn_id(name(2)), None);
        assert!(events(&mut a).contains(&Event::Close {
            peer: name(2),
            id: 10,
            reason: Some(UDP_HEARTBEAT_TIMEOUT.into())
        }));
    }

    /// Unknown channels are relayed once (surrogate); registered ones go to the application,
    /// which relays itself.
    #[test]
    fn surrogate_and_registered_gossip() {
        let t0 = Instant::now();
        let mut a = node_with(1, |_| {});
        for n in 2..=4 {
            a.register(t0, new_conn(n, n, true, n)).expect("added");
        }
        transmits(&mut a);
        let gossip = |payload: &[u8]| Message::Gossip {
            channel: "IPallocation".into(),
            src: name(2),
            payload: payload.to_vec(),
        };
        a.received(t0, 2, name(2), gossip(b"ring"));
        let relayed = transmits(&mut a);
        assert!(!relayed.is_empty());
        assert!(relayed
            .iter()
            .all(|(to, m)| *to != name(2)
                && matches!(m, Message::Gossip { src, .. } if *src == name(1))));
        a.received(t0, 3, name(3), gossip(b"ring"));
        assert!(transmits(&mut a).is_empty(), "seen already");

        a.register_channel("IPallocation");
        let first = apps(&mut a);
        let [("IPallocation", AppEvent::Peers(peers))] = &first[..] else {
            panic!("{first:?}");
        };
        assert_eq!(peers.len(), 1, "only we are known yet: {peers:?}");
        a.received(t0, 3, name(3), gossip(b"ring2"));
        assert!(
            transmits(&mut a).is_empty(),
            "the application relays, not the node"
        );
        assert_eq!(
            apps(&mut a),
            vec![(
                "IPallocation",
                AppEvent::Gossip {
                    kind: GossipKind::Neighbours,
                    src: name(2),
                    from: name(3),
                    payload: b"ring2".to_vec()
                }
            )]
        );
        // Rejecting drops the connection that delivered it.
        a.reject(t0, name(3), "bad ring".into());
        assert!(events(&mut a).contains(&Event::Close {
            peer: name(3),
            id: 3,
            reason: Some("bad ring".into())
        }));
    }

    /// Two nodes wired by hand: peer lists, unicast and broadcast both ways.
    #[test]
    fn app_channels_between_two_nodes() {
        let t0 = Instant::now();
        let mut a = node_with(1, |_| {});
        let mut b = node_with(2, |_| {});
        a.register_channel("c");
        b.register_channel("c");
        a.register(t0, new_conn(1, 2, true, 7)).expect("a");
        b.register(t0, new_conn(1, 1, false, 7)).expect("b");
        // Let them exchange topology until both know and reach each other.
        let mut t = t0;
        for _ in 0..5 {
            t += Duration::from_secs(2);
            a.handle_timeout(t);
            b.handle_timeout(t);
            for (_, m) in transmits(&mut a) {
                b.received(t, 1, name(1), m);
            }
            for (_, m) in transmits(&mut b) {
                a.received(t, 1, name(2), m);
            }
        }
        let last_peers = |evs: Vec<(&'static str, AppEvent)>| {
            evs.into_iter().rev().find_map(|(_, e)| match e {
                AppEvent::Peers(p) => Some(p),
                _ => None,
            })
        };
        let pa = last_peers(apps(&mut a)).expect("peers");
        assert_eq!(pa.len(), 2);
        assert!(pa.iter().all(|p| p.reachable), "{pa:?}");
        assert!(last_peers(apps(&mut b)).is_some_and(|p| p.len() == 2));

        a.app_send(
            t,
            "c",
            AppSend::Unicast {
                dst: name(2),
                payload: b"u".to_vec(),
            },
        );
        a.app_send(
            t,
            "c",
            AppSend::Broadcast {
                payload: b"b".to_vec(),
            },
        );
        a.app_send(
            t,
            "c",
            AppSend::Neighbours {
                payload: b"n".to_vec(),
            },
        );
        let sent = transmits(&mut a);
        assert_eq!(sent.len(), 3, "{sent:?}");
        for (to, m) in sent {
            assert_eq!(to, name(2));
            b.received(t, 1, name(1), m);
        }
        let got: Vec<(GossipKind, Vec<u8>)> = apps(&mut b)
            .into_iter()
            .filter_map(|(_, e)| match e {
                AppEvent::Gossip {
                    kind,
                    src,
                    from,
                    payload,
                } => {
                    assert_eq!((src, from), (name(1), name(1)));
                    Some((kind, payload))
                }
                AppEvent::Peers(_) => None,
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (GossipKind::Unicast, b"u".to_vec()),
                (GossipKind::Broadcast, b"b".to_vec()),
                (GossipKind::Neighbours, b"n".to_vec())
            ]
        );
        // The broadcast is not echoed back to its source.
        assert!(transmits(&mut b).is_empty());
        // b loses a: its peer list says so.
        b.closed(t, 1, name(1), None);
        let pb = last_peers(apps(&mut b)).expect("peers after close");
        assert!(
            pb.iter().all(|p| p.name == name(2) || !p.reachable),
            "{pb:?}"
        );
    }

    #[test]
    fn go_time_format() {
        let t = UNIX_EPOCH + Duration::from_secs(1_438_887_338);
        assert_eq!(go_time(t), "2015-08-06 18:55:38 +0000 UTC");
        assert_eq!(go_time(UNIX_EPOCH), "1970-01-01 00:00:00 +0000 UTC");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(go_time(leap), "2000-02-29 00:00:00 +0000 UTC");
    }

    fn live(udp_encrypted: bool) -> Live {
        Live {
            id: 1,
            addr: "192.168.48.11:6783".parse().expect("addr"),
            outbound: true,
            conn_uid: 5,
            udp_encrypted,
            nickname: "host1".into(),
            established: true,
            overlay: Some(OverlayPeer {
                conn_uid: 5,
                established: true,
                mtu: 1376,
                timed_out: false,
                ..OverlayPeer::default()
            }),
        }
    }

    fn connection_line(s: ConnectionStatus) -> String {
        let snap = StatusSnapshot {
            ready: true,
            failed: None,
            version: "x".into(),
            router: crate::status::RouterStatus {
                connections: vec![s],
                ..crate::status::RouterStatus::alone("8a:3e:3e:3e:3e:3e", "me", 6783, 1, 1)
            },
            proxy: None,
        };
        crate::status::render_connections(&snap)
    }

    #[test]
    fn live_connection_lines() {
        let name: PeerName = "7e:21:4a:70:2f:45".parse().expect("name");
        let s = live_status(name, &live(true), true);
        assert_eq!(s.info, "encrypted   sleeve 7e:21:4a:70:2f:45(host1)");
        assert_eq!(s.state, ConnectionState::Established);
        assert_eq!(
            connection_line(s),
            "-> 192.168.48.11:6783    established encrypted   sleeve 7e:21:4a:70:2f:45(host1) encrypted=true mtu=1376 udp_epoch=0 udp_key_drops=0 udp_key_switches=0\n"
        );
        // No password: neither the word nor the attribute.
        let s = live_status(name, &live(false), false);
        assert_eq!(s.info, "sleeve 7e:21:4a:70:2f:45(host1)");
        assert_eq!(
            connection_line(s),
            "-> 192.168.48.11:6783    established sleeve 7e:21:4a:70:2f:45(host1) mtu=1376\n"
        );
        // A password, but peers trusting each other: UDP in plaintext, and said so.
        let s = live_status(name, &live(false), true);
        assert_eq!(
            connection_line(s),
            "-> 192.168.48.11:6783    established unencrypted sleeve 7e:21:4a:70:2f:45(host1) encrypted=false mtu=1376\n"
        );
        // Pending, before the data plane reported on it: no MTU yet.
        let mut l = live(true);
        l.established = false;
        l.overlay = None;
        assert_eq!(
            connection_line(live_status(name, &l, true)),
            "-> 192.168.48.11:6783    pending     encrypted   sleeve 7e:21:4a:70:2f:45(host1) encrypted=true\n"
        );
    }
}
