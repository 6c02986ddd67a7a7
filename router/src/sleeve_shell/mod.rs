//! The sleeve data plane shell (spec router §4): one task owns the UDP socket (port 6783), the
//! capture receiver and injector on `vethwe-pcap`, the MAC cache, the route table and one
//! [`Forwarder`] per connected peer. The mesh feeds it [`DataPlaneCommand`]s; it publishes
//! [`DataPlaneStatus`] snapshots on a `watch` channel.
//!
//! Per loop turn the task handles one input — a command, a batch of captured frames (at most
//! [`BATCH`]), a batch of received datagrams (at most [`BATCH`]), or the timer — then drains the
//! transmits of every forwarder it touched and re-arms one sleep at the earliest forwarder
//! deadline. Back-pressure: a forwarder whose queue is full is flushed to the socket (awaiting
//! the send) before more frames are queued; the capture thread drops (and counts) frames when
//! this task falls behind.
//!
//! Sending: one socket for everything. Datagrams on the DF path go out with
//! `IP_PMTUDISC_DO`, the others with `IP_PMTUDISC_DONT` (the mode is switched only when it
//! changes); an EMSGSIZE on the DF path reads the kernel's path MTU and feeds
//! [`Forwarder::note_path_mtu`].
//!
//! Frames over the DF path's limit that carry IPv4 DF are dropped, counted (`frame_too_big`)
//! and answered with ICMP "fragmentation needed" ([`crate::icmp`], spec §4.8). Oversized IPv4
//! without DF is cut up by us ([`crate::fragment`]) while the peer's fragmentation test has not
//! passed; other oversized frames go on the kernel-fragmented path.

mod sys;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::capture::{Capture, CaptureConfig, CaptureError, CaptureStats, Injector};
use crate::fragment;
use crate::gro::Coalescer;
use crate::icmp;
use crate::mac_cache::{
    decide_captured, decide_received, flood_targets, CaptureDecision, Discard, Learned, MacCache,
    Owner, ReceiveDecision,
};
pub use crate::mesh::routes::RouteTable;
use crate::sleeve::codec::{Frame, Header};
use crate::sleeve::forwarder::{ForwarderStats, Transmit};
use crate::sleeve::{
    DropCounters, DropReason, Forwarder, ForwarderConfig, ForwarderEvent, PeerName, Received,
    SessionKeys,
};

/// Ethernet header: the difference between a frame and the IP packet it carries.
const ETH_HEADER_LEN: usize = 14;
/// Most captured frames or received datagrams handled per loop turn.
pub const BATCH: usize = 64;
/// Receive buffer: the largest UDP payload.
const RX_BUF: usize = 65536;
/// UDP socket receive/send buffer: bursts of a fast TCP flow (thousands of datagrams) must not
/// overflow while the data-plane task is busy, or TCP sees loss and halves its window.
const UDP_SOCKET_BUFFER: usize = 8 << 20;
/// How often status snapshots are refreshed (counters) when nothing else changed.
const STATUS_EVERY: Duration = Duration::from_secs(1);
/// MAC cache sweep interval (spec §4.4).
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// When no forwarder has a deadline, the timer still wakes this often.
const IDLE_TIMER: Duration = Duration::from_secs(3600);

/// What the mesh tells the data plane.
#[derive(Debug, Clone)]
pub enum DataPlaneCommand {
    /// A connection to `name` is up: create (or replace) its forwarder. `remote`: the peer's
    /// UDP address when known (the dialler's side: the TCP address); the listener learns it from
    /// the first valid heartbeat. `udp_keys`: `None` = plaintext (trusted subnets / no password):
    /// then `remote` must be given, and datagrams are accepted from that address only.
    PeerUp {
        name: PeerName,
        conn_uid: u64,
        remote: Option<SocketAddr>,
        udp_keys: Option<SessionKeys>,
    },
    /// The connection to `name` is gone: drop its forwarder.
    PeerDown { name: PeerName },
    /// New UDP keys for `name` (rekey / password rotation).
    Rekey { name: PeerName, keys: SessionKeys },
    /// New routes (after a topology change).
    Routes(RouteTable),
}

/// Settings of [`run_data_plane`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataPlaneConfig {
    pub me: PeerName,
    /// Normally 0.0.0.0:6783.
    pub udp_bind: SocketAddr,
    /// Normally `vethwe-pcap`.
    pub capture_iface: String,
    /// Upper bound of PMTU discovery, as an overlay MTU (65535: discover from the path).
    pub mtu: u16,
    pub capture: CaptureConfig,
}

impl DataPlaneConfig {
    pub fn new(me: PeerName, udp_bind: SocketAddr) -> Self {
        DataPlaneConfig {
            me,
            udp_bind,
            capture_iface: crate::bridge::CAPTURE_IFNAME.to_string(),
            mtu: u16::MAX,
            capture: CaptureConfig::default(),
        }
    }
}

/// Drops decided by the shell itself (the forwarders count theirs in [`PeerStatus::drops`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ShellDrops {
    /// Datagrams whose header did not parse (garbage on the port), by reason.
    #[serde(skip)]
    pub bad_header: DropCounters,
    /// Datagrams with a valid header from a peer we have no forwarder for.
    pub unknown_sender: u64,
    /// Frames naming a source or destination peer we do not know.
    pub unknown_peer: u64,
    /// Frames for a destination without a route (or whose next hop has no forwarder).
    pub no_route: u64,
    /// Frames over the path MTU that we cannot fragment (answered with ICMP, rate limited).
    pub frame_too_big: u64,
    /// ICMP replies not sent: over the rate limit ([`icmp::RateLimiter`]).
    pub icmp_rate_limited: u64,
    /// MAC cache entries evicted because it was full.
    pub macs_evicted: u64,
    /// Captured frames whose source MAC lives at a remote peer (likely our own injection).
    pub source_is_remote: u64,
    /// Frames shorter than an Ethernet header.
    pub malformed: u64,
    /// Frames the forwarder refused (queue full, no address yet, closed...).
    pub forwarder_refused: u64,
    pub inject_failed: u64,
    pub send_failed: u64,
    pub recv_failed: u64,
}

impl ShellDrops {
    pub fn bad_header_total(&self) -> u64 {
        self.bad_header.total()
    }
}

/// One peer connection as the data plane sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub conn_uid: u64,
    pub remote: Option<SocketAddr>,
    /// UDP works both ways.
    pub established: bool,
    pub encrypted: bool,
    /// Effective overlay MTU on the DF path.
    pub mtu: u16,
    pub pmtu_verified: bool,
    /// Kernel fragmentation of our datagrams reaches the peer.
    pub stack_frag: bool,
    /// No heartbeat for 60 s: the forwarder closed; the mesh should drop the connection.
    pub timed_out: bool,
    pub stats: ForwarderStats,
    pub drops: DropCounters,
    /// The UDP key epoch we send on.
    pub udp_epoch: u32,
    /// Times the sending epoch moved on (rekeys completed on the data path).
    pub udp_key_switches: u64,
    /// Datagrams dropped for their key epoch (stale or not known yet).
    pub udp_key_drops: u64,
}

/// Snapshot published after changes and about once a second.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataPlaneStatus {
    pub peers: BTreeMap<PeerName, PeerStatus>,
    pub capture: CaptureStats,
    pub drops: ShellDrops,
    pub captured_frames: u64,
    pub injected_frames: u64,
    pub received_datagrams: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    #[error("cannot bind the sleeve UDP socket {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot set up the sleeve UDP socket: {0}")]
    Socket(#[source] io::Error),
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error("the capture on {0} ended")]
    CaptureEnded(String),
}

struct Peer {
    conn_uid: u64,
    fwd: Forwarder<SocketAddr>,
    timed_out: bool,
}

/// The state owned by the data-plane task.
struct Plane {
    me: PeerName,
    max_mtu: u16,
    out: UdpOut,
    injector: Injector,
    /// Frames to inject, merged per TCP flow; injected at the end of every loop turn.
    to_inject: Coalescer,
    macs: MacCache<PeerName>,
    icmp_limit: icmp::RateLimiter,
    routes: RouteTable,
    peers: HashMap<PeerName, Peer>,
    /// Forwarders touched since the last flush.
    dirty: HashSet<PeerName>,
    /// Scratch list for draining `dirty` without allocating.
    flushing: Vec<PeerName>,
    tx: Vec<u8>,
    hops: Vec<PeerName>,
    drops: ShellDrops,
    captured_frames: u64,
    injected_frames: u64,
    received_datagrams: u64,
    status_changed: bool,
}

fn std_now() -> std::time::Instant {
    Instant::now().into_std()
}

/// Run the sleeve until `shutdown` resolves or the command channel closes. Opens the capture on
/// `config.capture_iface` and binds `config.udp_bind`, in the calling thread's network namespace.
pub async fn run_data_plane(
    config: DataPlaneConfig,
    mut commands: mpsc::Receiver<DataPlaneCommand>,
    status: watch::Sender<DataPlaneStatus>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DataPlaneError> {
    let std_socket =
        std::net::UdpSocket::bind(config.udp_bind).map_err(|source| DataPlaneError::Bind {
            addr: config.udp_bind,
            source,
        })?;
    std_socket
        .set_nonblocking(true)
        .map_err(DataPlaneError::Socket)?;
    sys::set_df(&std_socket, true).map_err(DataPlaneError::Socket)?;
    if let Err(e) = sys::set_buffers(&std_socket, UDP_SOCKET_BUFFER) {
        tracing::warn!(error = %e, "sleeve: cannot enlarge the UDP socket buffers");
    }
    if let Err(e) = sys::enable_gro(&std_socket) {
        tracing::info!(error = %e, "sleeve: no UDP receive offload; one datagram per read");
    }
    let udp = UdpSocket::from_std(std_socket).map_err(DataPlaneError::Socket)?;
    let (mut capture, injector) = Capture::open(&config.capture_iface, config.capture)?;
    tracing::info!(me = %config.me, udp = %config.udp_bind, iface = %config.capture_iface, "sleeve data plane started");

    let mut plane = Plane {
        me: config.me,
        max_mtu: config.mtu,
        out: UdpOut::new(udp),
        injector,
        to_inject: Coalescer::new(),
        macs: MacCache::default(),
        icmp_limit: icmp::RateLimiter::icmp(std_now()),
        routes: RouteTable::default(),
        peers: HashMap::new(),
        dirty: HashSet::new(),
        flushing: Vec::new(),
        tx: Vec::with_capacity(RX_BUF),
        hops: Vec::new(),
        drops: ShellDrops::default(),
        captured_frames: 0,
        injected_frames: 0,
        received_datagrams: 0,
        status_changed: true,
    };
    let mut rx = vec![0u8; RX_BUF];
    let mut frames: Vec<Bytes> = Vec::with_capacity(BATCH);
    let timer = tokio::time::sleep(IDLE_TIMER);
    tokio::pin!(timer);
    tokio::pin!(shutdown);
    let mut status_tick = tokio::time::interval(STATUS_EVERY);
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_sweep = Instant::now() + SWEEP_EVERY;

    let result = loop {
        tokio::select! {
            () = &mut shutdown => break Ok(()),
            cmd = commands.recv() => match cmd {
                Some(cmd) => plane.on_command(cmd),
                None => break Ok(()),
            },
            n = capture.recv_many(&mut frames, BATCH) => {
                if n == 0 {
                    break Err(DataPlaneError::CaptureEnded(config.capture_iface.clone()));
                }
                for frame in frames.drain(..) {
                    plane.on_captured(&frame).await;
                }
            },
            r = plane.out.socket.readable() => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "sleeve: UDP socket failed");
                }
                for _ in 0..BATCH {
                    let socket = &plane.out.socket;
                    match socket.try_io(Interest::READABLE, || sys::recv_segments(socket, &mut rx)) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        r => plane.on_recv_result(r, &mut rx).await,
                    }
                }
            },
            () = &mut timer => plane.on_timer(),
            _ = status_tick.tick() => {
                plane.status_changed = true;
                let now = Instant::now();
                if now >= next_sweep {
                    let gone = plane.macs.sweep(now.into_std());
                    tracing::debug!(gone, "MAC cache swept");
                    next_sweep = now + SWEEP_EVERY;
                }
            },
        }
        plane.inject_pending();
        plane.flush_dirty().await;
        let deadline = plane
            .next_deadline()
            .unwrap_or_else(|| Instant::now() + IDLE_TIMER);
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        if plane.status_changed {
            plane.status_changed = false;
            status.send_replace(plane.snapshot(capture.stats()));
        }
    };
    status.send_replace(plane.snapshot(capture.stats()));
    capture.close();
    tracing::info!("sleeve data plane stopped");
    result
}

impl Plane {
    fn snapshot(&self, capture: CaptureStats) -> DataPlaneStatus {
        let peers = self
            .peers
            .iter()
            .map(|(name, p)| {
                (
                    *name,
                    PeerStatus {
                        conn_uid: p.conn_uid,
                        remote: p.fwd.remote_addr().copied(),
                        established: p.fwd.is_established(),
                        encrypted: p.fwd.is_encrypted(),
                        mtu: p.fwd.effective_mtu(),
                        pmtu_verified: p.fwd.pmtu_verified(),
                        stack_frag: p.fwd.stack_frag(),
                        timed_out: p.timed_out,
                        stats: p.fwd.stats().clone(),
                        drops: p.fwd.drops().clone(),
                        udp_epoch: p.fwd.udp_epoch(),
                        udp_key_switches: p.fwd.key_stats().switches,
                        udp_key_drops: p.fwd.key_drops(),
                    },
                )
            })
            .collect();
        let mut drops = self.drops.clone();
        drops.macs_evicted = self.macs.evicted();
        drops.icmp_rate_limited = self.icmp_limit.limited();
        DataPlaneStatus {
            peers,
            capture,
            drops,
            captured_frames: self.captured_frames,
            injected_frames: self.injected_frames,
            received_datagrams: self.received_datagrams,
        }
    }

    fn on_command(&mut self, cmd: DataPlaneCommand) {
        let now = std_now();
        self.status_changed = true;
        match cmd {
            DataPlaneCommand::PeerUp {
                name,
                conn_uid,
                remote,
                udp_keys,
            } => {
                let mut cfg = ForwarderConfig::new(self.me, name, conn_uid);
                cfg.max_mtu = self.max_mtu;
                cfg.queue_capacity = BATCH;
                cfg.probe_seed = rand_core::RngCore::next_u32(&mut rand_core::OsRng);
                let encrypted = udp_keys.is_some();
                cfg.pin_remote_addr = !encrypted;
                if !encrypted && remote.is_none() {
                    tracing::warn!(peer = %name, "sleeve: plaintext connection without a known address: its datagrams are dropped");
                }
                let fwd = Forwarder::new(now, cfg, udp_keys, remote);
                tracing::info!(peer = %name, ?remote, encrypted, "sleeve: forwarder up");
                self.peers.insert(
                    name,
                    Peer {
                        conn_uid,
                        fwd,
                        timed_out: false,
                    },
                );
                self.dirty.insert(name);
            }
            DataPlaneCommand::PeerDown { name } => {
                if self.peers.remove(&name).is_some() {
                    tracing::info!(peer = %name, "sleeve: forwarder down");
                }
                self.dirty.remove(&name);
            }
            DataPlaneCommand::Rekey { name, keys } => {
                if let Some(p) = self.peers.get_mut(&name) {
                    p.fwd.rekey(now, keys);
                    self.dirty.insert(name);
                }
            }
            DataPlaneCommand::Routes(routes) => self.routes = routes,
        }
    }

    fn on_timer(&mut self) {
        let now = std_now();
        for (name, p) in &mut self.peers {
            if p.fwd.poll_timeout().is_some_and(|t| t <= now) {
                p.fwd.handle_timeout(now);
                self.dirty.insert(*name);
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.peers
            .values()
            .filter_map(|p| p.fwd.poll_timeout())
            .min()
            .map(Instant::from_std)
    }

    fn known(&self, peer: PeerName) -> bool {
        peer == self.me || self.routes.unicast.contains_key(&peer) || self.peers.contains_key(&peer)
    }

    async fn on_captured(&mut self, frame: &[u8]) {
        self.captured_frames += 1;
        let now = std_now();
        match decide_captured(&mut self.macs, now, frame) {
            CaptureDecision::Discard(Discard::SourceIsRemote) => {
                self.drops.source_is_remote += 1;
                tracing::debug!("captured a frame whose source MAC lives at a remote peer");
            }
            CaptureDecision::Discard(Discard::Malformed) => self.drops.malformed += 1,
            CaptureDecision::Discard(Discard::Stp | Discard::LocalDestination) => {}
            CaptureDecision::Unicast(dst) => match self.routes.unicast.get(&dst).copied() {
                Some(hop) => self.forward(hop, self.me, dst, frame).await,
                None => self.drops.no_route += 1,
            },
            CaptureDecision::Broadcast => {
                let mut hops = std::mem::take(&mut self.hops);
                hops.clear();
                if let Some(tree) = self.routes.broadcast.get(&self.me) {
                    hops.extend(flood_targets(tree, self.me, None));
                }
                for hop in &hops {
                    self.forward(*hop, self.me, *hop, frame).await;
                }
                self.hops = hops;
            }
        }
    }

    async fn on_recv_result(&mut self, r: io::Result<sys::Segments>, rx: &mut [u8]) {
        let run = match r {
            Ok(run) => run,
            Err(e) => {
                self.drops.recv_failed += 1;
                tracing::debug!(error = %e, "sleeve: UDP receive failed");
                return;
            }
        };
        if run.truncated {
            self.drops.recv_failed += 1;
            return;
        }
        let Some(received) = rx.get_mut(..run.len) else {
            return;
        };
        let size = run.segment_size.unwrap_or(run.len).max(1);
        for datagram in received.chunks_mut(size) {
            self.on_datagram(run.from, datagram).await;
        }
    }

    async fn on_datagram(&mut self, from: SocketAddr, datagram: &mut [u8]) {
        self.received_datagrams += 1;
        let now = std_now();
        let header = match Header::parse(datagram) {
            Ok(h) => h,
            Err(e) => {
                self.drops.bad_header.record(DropReason::from(e));
                return;
            }
        };
        let sender = header.sender;
        let Some(peer) = self.peers.get_mut(&sender) else {
            self.drops.unknown_sender += 1;
            return;
        };
        self.dirty.insert(sender);
        let received = peer.fwd.handle_datagram(now, from, datagram);
        if let Ok(Received::Frames(frames)) = received {
            for frame in frames {
                self.on_received_frame(sender, frame).await;
            }
        }
    }

    async fn on_received_frame(&mut self, arrived_from: PeerName, f: Frame<'_>) {
        if !self.known(f.src) || !self.known(f.dst) {
            self.drops.unknown_peer += 1;
            return;
        }
        if f.src == self.me {
            tracing::debug!(from = %arrived_from, "sleeve: received a frame we captured (loop)");
        }
        let now = std_now();
        match decide_received(&mut self.macs, now, self.me, f.src, f.dst, f.data) {
            ReceiveDecision::Relay(dst) => match self.routes.unicast.get(&dst).copied() {
                Some(hop) => self.forward(hop, f.src, dst, f.data).await,
                None => self.drops.no_route += 1,
            },
            ReceiveDecision::Malformed => self.drops.malformed += 1,
            ReceiveDecision::Inject { flood, learned } => {
                match learned {
                    Learned::New => tracing::debug!(peer = %f.src, "Discovered remote MAC"),
                    Learned::Moved { from } => {
                        let was = match from {
                            Owner::Local => "local".to_string(),
                            Owner::Peer(p) => p.to_string(),
                        };
                        tracing::info!(peer = %f.src, %was, "Discovered remote MAC (moved)");
                    }
                    Learned::Refreshed | Learned::Conflict(_) | Learned::Ignored => {}
                }
                self.to_inject.push(f.data);
                self.injected_frames += 1;
                if flood {
                    let mut hops = std::mem::take(&mut self.hops);
                    hops.clear();
                    if let Some(tree) = self.routes.broadcast.get(&f.src) {
                        hops.extend(flood_targets(tree, f.src, Some(arrived_from)));
                    }
                    for hop in &hops {
                        self.forward(*hop, f.src, *hop, f.data).await;
                    }
                    self.hops = hops;
                }
            }
        }
    }

    /// Send `frame` (original source `src`, final destination `dst`) through neighbour `hop`:
    /// on the DF path when it fits; else answered with ICMP (IPv4 with DF), cut up by us (IPv4
    /// without DF while the peer does not get kernel-fragmented datagrams), or on the
    /// kernel-fragmented path.
    async fn forward(&mut self, hop: PeerName, src: PeerName, dst: PeerName, frame: &[u8]) {
        let Some(peer) = self.peers.get_mut(&hop) else {
            self.drops.no_route += 1;
            return;
        };
        let limit = peer.fwd.max_frame_len(true);
        if frame.len() <= limit {
            self.queue(hop, src, dst, frame, true).await;
        } else if icmp::ipv4_df(frame) {
            self.drops.frame_too_big += 1;
            let mtu = limit.saturating_sub(ETH_HEADER_LEN);
            self.answer_frag_needed(src, dst, frame, u16::try_from(mtu).unwrap_or(u16::MAX));
        } else if !peer.fwd.stack_frag() && fragment::fragmentable(frame) {
            match fragment::fragment(frame, limit) {
                Some(pieces) => {
                    for piece in &pieces {
                        self.queue(hop, src, dst, piece, true).await;
                    }
                }
                None => self.drops.frame_too_big += 1,
            }
        } else {
            self.queue(hop, src, dst, frame, false).await;
        }
    }

    /// Queue `frame` on `hop`'s forwarder, flushing it first when its queue is full.
    async fn queue(&mut self, hop: PeerName, src: PeerName, dst: PeerName, frame: &[u8], df: bool) {
        if self
            .peers
            .get(&hop)
            .is_some_and(|p| p.fwd.queued_frames() >= p.fwd.config().queue_capacity)
        {
            self.flush(hop).await;
        }
        let Some(peer) = self.peers.get_mut(&hop) else {
            return;
        };
        match peer.fwd.queue_frame(src, dst, frame, df) {
            Ok(()) => {
                self.dirty.insert(hop);
            }
            Err(reason) => {
                self.drops.forwarder_refused += 1;
                tracing::trace!(peer = %hop, reason = reason.as_str(), "sleeve: frame refused");
            }
        }
    }

    /// `frame` (IPv4 with DF, from peer `src` to peer `dst`) does not fit the path: answer its
    /// sender with ICMP "fragmentation needed" as if from `dst` — injected here when we
    /// captured it, else sent back toward `src`. Broadcasts are only dropped.
    fn answer_frag_needed(&mut self, src: PeerName, dst: PeerName, frame: &[u8], mtu: u16) {
        if frame.first().is_some_and(|b| b & 1 != 0) {
            return;
        }
        let Some(reply) = icmp::frag_needed(frame, mtu) else {
            return;
        };
        if !self.icmp_limit.allow(std_now()) {
            return;
        }
        tracing::debug!(%dst, %src, pmtu = mtu, "sleeve: sending ICMP 3,4 (dst -> src)");
        if src == self.me {
            self.to_inject.push(&reply);
            return;
        }
        let Some(peer) = self
            .routes
            .unicast
            .get(&src)
            .and_then(|hop| self.peers.get_mut(hop))
        else {
            self.drops.no_route += 1;
            return;
        };
        match peer.fwd.queue_frame(dst, src, &reply, false) {
            Ok(()) => {
                self.dirty.insert(peer.fwd.config().remote);
            }
            Err(_) => self.drops.forwarder_refused += 1,
        }
    }

    /// Inject the frames received this turn, merged per TCP flow.
    fn inject_pending(&mut self) {
        if self.to_inject.is_empty() {
            return;
        }
        let mut merged_refused = false;
        let mut frames = self.to_inject.drain();
        while let Some(out) = frames.next_frame() {
            if let Err(e) = self.injector.inject(out.frame, out.gso) {
                self.drops.inject_failed += 1;
                tracing::debug!(error = %e, "sleeve: injection failed");
                // EINVAL: the kernel rejects the virtio-net header itself.
                let refused = match &e {
                    CaptureError::Io { source, .. } => source.raw_os_error() == Some(libc::EINVAL),
                    _ => false,
                };
                merged_refused |= refused && out.gso.is_some();
            }
        }
        drop(frames);
        if merged_refused {
            // Lost segments are resent by TCP; unmerged, they get through.
            tracing::warn!(
                "sleeve: the kernel refuses merged TCP frames; injecting segments one by one"
            );
            self.to_inject.disable();
        }
    }

    async fn flush_dirty(&mut self) {
        let mut names = std::mem::take(&mut self.flushing);
        names.clear();
        names.extend(self.dirty.drain());
        for name in &names {
            self.flush(*name).await;
        }
        self.flushing = names;
    }

    /// Send everything `name`'s forwarder has to send, then take its events.
    async fn flush(&mut self, name: PeerName) {
        let now = std_now();
        let Plane {
            peers,
            out,
            tx,
            drops,
            ..
        } = self;
        let Some(peer) = peers.get_mut(&name) else {
            return;
        };
        while let Some(t) = peer.fwd.poll_transmit(now, tx) {
            let Some(bytes) = tx.get(..t.size) else {
                continue;
            };
            if !out.batch_accepts(&t) {
                out.send_batch(name, &mut peer.fwd, drops).await;
            }
            if out.batch_accepts(&t) {
                out.add_to_batch(bytes, t.destination);
            } else {
                out.send(bytes, t.destination, t.df, name, &mut peer.fwd, drops)
                    .await;
            }
        }
        out.send_batch(name, &mut peer.fwd, drops).await;
        let status_changed = &mut self.status_changed;
        while let Some(event) = peer.fwd.poll_event() {
            *status_changed = true;
            match event {
                ForwarderEvent::Established => {
                    tracing::info!(peer = %name, "sleeve: connection fully established");
                }
                ForwarderEvent::PmtuVerified(mtu) => {
                    tracing::info!(peer = %name, mtu, "sleeve: effective MTU verified");
                }
                ForwarderEvent::HeartbeatTimedOut => {
                    peer.timed_out = true;
                    tracing::warn!(peer = %name, "sleeve: timed out waiting for UDP heartbeat");
                }
                ForwarderEvent::RemoteAddressChanged => {
                    tracing::info!(peer = %name, remote = ?peer.fwd.remote_addr(), "sleeve: peer UDP address changed");
                }
                ForwarderEvent::StackFragmentation(ok) => {
                    tracing::debug!(peer = %name, ok, "sleeve: fragmentation test");
                }
            }
        }
    }
}

/// Most datagrams in one `UDP_SEGMENT` send (the kernel's limit is 64 on older kernels).
const GSO_MAX_SEGMENTS: usize = 64;
/// Most bytes in one `UDP_SEGMENT` send (one UDP datagram's worth).
const GSO_MAX_BYTES: usize = 65000;

/// The UDP socket and how we send on it: the current DF mode, and a batch of equal-sized DF
/// datagrams for one destination that goes out in a single `sendmsg` with `UDP_SEGMENT` (the
/// kernel cuts it up as late as possible, on the underlay, or never when it crosses veths).
struct UdpOut {
    socket: UdpSocket,
    /// Current `IP_MTU_DISCOVER` mode of the socket (true = DF).
    df_mode: bool,
    /// Segmentation offload works here (cleared after the kernel refused it).
    gso: bool,
    batch: GsoBatch,
}

/// DF datagrams for one destination, all of one size but a shorter last one: what a single
/// `UDP_SEGMENT` send can carry (pure).
#[derive(Debug, Default)]
struct GsoBatch {
    bytes: Vec<u8>,
    to: Option<SocketAddrV4>,
    /// Size of every datagram but a shorter last one.
    segment: usize,
    segments: usize,
    /// A shorter datagram ended the batch.
    closed: bool,
}

impl GsoBatch {
    /// May a DF datagram of `size` bytes for `to` join (or start) the batch?
    fn accepts(&self, to: SocketAddrV4, size: usize) -> bool {
        match self.to {
            None => size <= GSO_MAX_BYTES,
            Some(batch_to) => {
                batch_to == to
                    && !self.closed
                    && size <= self.segment
                    && self.segments < GSO_MAX_SEGMENTS
                    && self.bytes.len() + size <= GSO_MAX_BYTES
            }
        }
    }

    /// Add a datagram [`GsoBatch::accepts`] took.
    fn push(&mut self, datagram: &[u8], to: SocketAddrV4) {
        if self.to.is_none() {
            self.to = Some(to);
            self.segment = datagram.len();
        } else if datagram.len() < self.segment {
            self.closed = true;
        }
        self.bytes.extend_from_slice(datagram);
        self.segments += 1;
    }

    /// Empty the batch: its destination, bytes, segment size and count (`None` if empty). Put
    /// the bytes back with [`GsoBatch::recycle`] to keep the allocation.
    fn take(&mut self) -> Option<(SocketAddrV4, Vec<u8>, usize, usize)> {
        let to = self.to.take()?;
        let segments = std::mem::take(&mut self.segments);
        self.closed = false;
        Some((to, std::mem::take(&mut self.bytes), self.segment, segments))
    }

    fn recycle(&mut self, mut bytes: Vec<u8>) {
        bytes.clear();
        self.bytes = bytes;
    }
}

impl UdpOut {
    fn new(socket: UdpSocket) -> Self {
        UdpOut {
            socket,
            df_mode: true,
            gso: true,
            batch: GsoBatch {
                bytes: Vec::with_capacity(GSO_MAX_BYTES),
                ..GsoBatch::default()
            },
        }
    }

    /// May `t` go into the current batch (or start one)?
    fn batch_accepts(&self, t: &Transmit<SocketAddr>) -> bool {
        match t.destination {
            SocketAddr::V4(to) => self.gso && t.df && self.batch.accepts(to, t.size),
            SocketAddr::V6(_) => false,
        }
    }

    /// Add a datagram `batch_accepts` took.
    fn add_to_batch(&mut self, datagram: &[u8], to: SocketAddr) {
        if let SocketAddr::V4(to) = to {
            self.batch.push(datagram, to);
        }
    }

    /// Send the batch, if any: one datagram plainly, several with `UDP_SEGMENT`; datagram by
    /// datagram if the kernel refuses the batch.
    async fn send_batch(
        &mut self,
        name: PeerName,
        fwd: &mut Forwarder<SocketAddr>,
        drops: &mut ShellDrops,
    ) {
        let Some((to, bytes, segment, segments)) = self.batch.take() else {
            return;
        };
        let sent_whole = segments > 1 && self.send_segments(&bytes, segment, to).await;
        if !sent_whole {
            for datagram in bytes.chunks(segment.max(1)) {
                self.send(datagram, SocketAddr::V4(to), true, name, fwd, drops)
                    .await;
            }
        }
        self.batch.recycle(bytes);
    }

    /// One `UDP_SEGMENT` send; false when the datagrams must go one by one instead.
    async fn send_segments(&mut self, batch: &[u8], segment: usize, to: SocketAddrV4) -> bool {
        let Ok(segment) = u16::try_from(segment) else {
            return false;
        };
        if !self.set_df(true) {
            return false;
        }
        let socket = &self.socket;
        let sent = socket
            .async_io(Interest::WRITABLE, || {
                sys::send_segments(socket, batch, segment, to)
            })
            .await;
        match sent {
            Ok(_) => true,
            // EMSGSIZE / EINVAL: a datagram is over the path MTU; sent one by one, the first
            // gets the EMSGSIZE that starts PMTU discovery.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMSGSIZE | libc::EINVAL)) => false,
            Err(e) => {
                // EIO: the route's device cannot checksum for us; others: no UDP_SEGMENT.
                tracing::info!(error = %e, "sleeve: UDP segmentation offload unavailable; sending datagrams one by one");
                self.gso = false;
                false
            }
        }
    }

    /// Switch the socket's DF mode if needed; false if that failed.
    fn set_df(&mut self, df: bool) -> bool {
        if df == self.df_mode {
            return true;
        }
        match sys::set_df(&self.socket, df) {
            Ok(()) => {
                self.df_mode = df;
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "sleeve: cannot switch DF mode");
                false
            }
        }
    }

    /// Send one datagram; an EMSGSIZE on the DF path tells `fwd` the kernel's path MTU.
    async fn send(
        &mut self,
        datagram: &[u8],
        to: SocketAddr,
        df: bool,
        name: PeerName,
        fwd: &mut Forwarder<SocketAddr>,
        drops: &mut ShellDrops,
    ) {
        self.set_df(df);
        match self.socket.send_to(datagram, to).await {
            Ok(_) => {}
            Err(e) if df && e.raw_os_error() == Some(libc::EMSGSIZE) => match sys::path_mtu(to) {
                Ok(pmtu) => {
                    tracing::debug!(peer = %name, pmtu, size = datagram.len(), "sleeve: EMSGSIZE");
                    fwd.note_path_mtu(std_now(), pmtu);
                }
                Err(e) => tracing::warn!(error = %e, "sleeve: cannot read the path MTU"),
            },
            Err(e) => {
                drops.send_failed += 1;
                tracing::debug!(peer = %name, error = %e, "sleeve: UDP send failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::peer::{Peer, PeerUid};
    use crate::mesh::topology::Topology;
    use crate::mesh::topology::{ConnSummary, PeerEntry};

    fn name(n: u64) -> PeerName {
        PeerName::from_u64(n)
    }

    fn conn(to: u64, outbound: bool) -> ConnSummary {
        ConnSummary {
            remote: name(to),
            addr: String::new(),
            outbound,
            established: true,
        }
    }

    #[test]
    fn gso_batches_equal_datagrams_for_one_destination() {
        let a = SocketAddrV4::new([192, 0, 2, 11].into(), 6783);
        let b = SocketAddrV4::new([192, 0, 2, 12].into(), 6783);
        let mut batch = GsoBatch::default();
        assert!(batch.take().is_none());
        for _ in 0..3 {
            assert!(batch.accepts(a, 1400));
            batch.push(&[1; 1400], a);
        }
        assert!(!batch.accepts(b, 1400), "another destination");
        assert!(!batch.accepts(a, 1401), "a larger datagram");
        assert!(batch.accepts(a, 100), "a shorter last one");
        batch.push(&[2; 100], a);
        assert!(!batch.accepts(a, 100), "nothing after the shorter one");
        let (to, bytes, segment, segments) = batch.take().expect("a batch");
        assert_eq!((to, bytes.len(), segment, segments), (a, 4300, 1400, 4));
        batch.recycle(bytes);
        assert!(batch.accepts(b, 1400), "empty again");
    }

    #[test]
    fn gso_batches_stay_within_the_kernel_limits() {
        let a = SocketAddrV4::new([192, 0, 2, 11].into(), 6783);
        let mut batch = GsoBatch::default();
        while batch.accepts(a, 100) {
            batch.push(&[0; 100], a);
        }
        assert_eq!(batch.segments, GSO_MAX_SEGMENTS);
        let mut big = GsoBatch::default();
        while big.accepts(a, 1400) {
            big.push(&[0; 1400], a);
        }
        assert!(big.bytes.len() <= GSO_MAX_BYTES);
        assert!(big.bytes.len() + 1400 > GSO_MAX_BYTES);
        assert!(!GsoBatch::default().accepts(a, GSO_MAX_BYTES + 1));
    }

    #[test]
    fn route_table_for_a_line() {
        // 1 (me) — 2 — 3
        let mut topo = Topology::new(&Peer {
            name: name(1),
            nickname: "me".into(),
            uid: PeerUid(1),
            version: 0,
        });
        topo.merge(vec![
            PeerEntry {
                name: name(2),
                nickname: String::new(),
                uid: PeerUid(2),
                version: 1,
                short_id: None,
                conns: vec![conn(1, false), conn(3, true)],
            },
            PeerEntry {
                name: name(3),
                nickname: String::new(),
                uid: PeerUid(3),
                version: 1,
                short_id: None,
                conns: vec![conn(2, false)],
            },
        ]);
        topo.add_local_conn(conn(2, true));
        let r = RouteTable::compute(&topo);
        assert_eq!(r.unicast.get(&name(2)), Some(&name(2)));
        assert_eq!(r.unicast.get(&name(3)), Some(&name(2)));
        assert_eq!(r.broadcast.get(&name(1)), Some(&vec![name(2)]));
        assert_eq!(r.broadcast.get(&name(3)), Some(&vec![]));
    }
}
