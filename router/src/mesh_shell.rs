//! The mesh shell (spec §2.1, §3.3, §3.7): real TCP connections on port 6783 driving the sans-IO
//! core in [`crate::mesh`].
//!
//! Tasks, each owning its own state (no shared state behind a mutex):
//! - the **acceptor** (`accept_loop`) takes inbound connections. Each one must first get a
//!   handshake slot ([`PendingLimits`]: at most [`MAX_PENDING_INBOUND`] inbound handshakes in
//!   progress, [`MAX_PENDING_PER_IP`] per source address; extra connections are closed at once,
//!   counted and logged at debug level, rate limited). Admitted ones are paced by a token bucket
//!   (burst 20, then one per 50 ms) and get a connection task. Our own dials never take these
//!   slots: their budget is the connection maker's (`conn_limit`), so an inbound flood cannot
//!   stop the mesh from reconnecting;
//! - one **connection task** per TCP connection (`connection`) runs the [`Handshake`] (cheap: the
//!   password is stretched once at start), registers with the mesh task, then drives the
//!   [`Conn`] (heartbeats, rekeying) until an error or a close;
//! - the **mesh task** (`Mesh`) owns the topology (behind its [`GossipChannel`]), the routes, the
//!   [`ConnectionMaker`] and the registry of live connections; it dials, gossips, decides
//!   duplicates and publishes the status on a `watch` channel.
//!
//! Connection tasks talk to the mesh task over a queue bounded in count and bytes
//! ([`TO_MESH_QUEUE`], [`TO_MESH_BYTES`], shared by all connections; awaited, so a busy mesh task
//! slows down reading from the sockets, and TCP pushes back on the peers); the mesh task never
//! awaits a connection task (each has its own queue, [`TO_CONN_QUEUE`] / [`TO_CONN_BYTES`]; the
//! mesh uses `try_send`, a full queue drops the message and counts it, and periodic gossip repairs
//! that), so the two can never deadlock. Gossip on channels other than topology is capped at
//! [`MAX_GOSSIP_PAYLOAD`] per message, checked as soon as it is decoded.
//!
//! For the sleeve shell: [`start`] returns a `watch` of the [`DataPlaneView`] (live connections
//! with their UDP keys, and the data-plane routes; latest wins, so nothing queues up behind a
//! slow data plane); [`MeshHandle::send_overlay`] sends overlay
//! control messages to a peer; [`MeshHandle::overlay_status`] feeds back what the data plane
//! says about its forwarders. As in Weave (spec §2.1, §4.7), a connection stays `pending` until
//! its forwarder (same connection UID) is established over UDP, and is torn down with
//! `timed out waiting for UDP heartbeat` when that forwarder hears nothing for 60 s.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rand_core::OsRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::addr::Ipv4Cidr;
use crate::mesh::app::{AppEvent, AppSend};
use crate::mesh::conn::{Conn, ConnConfig, ConnEvent, Message, UdpKeys};
use crate::mesh::connmaker::{parse_peer_spec, DirectPeer};
use crate::mesh::gossip::MAX_GOSSIP_PAYLOAD;
use crate::mesh::handshake::{
    Established, Handshake, HandshakeConfig, HandshakeError, KdfParams, Progress,
};
use crate::mesh::node::{arrow, Event, NewConn, Node, NodeConfig, NodeStatus};
pub use crate::mesh::node::{
    DataPlaneView, OverlayPeer, OverlayStatus, PeerLink, TOPOLOGY_CHANNEL, UDP_HEARTBEAT_TIMEOUT,
};
use crate::mesh::peer::{Peer, PeerName, PeerUid};
use crate::queue::{self, Weigh};
use crate::status::StatusSnapshot;

/// Inbound connections still in their handshake, in total (spec §2.1 pacing is not enough: a
/// Hello-only connection holds its task until the handshake deadline).
pub const MAX_PENDING_INBOUND: usize = 64;
/// Inbound connections still in their handshake from one source address.
pub const MAX_PENDING_PER_IP: usize = 4;
/// At most one debug line per this interval about refused inbound connections.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);
/// Deadline for the TCP connect of a dial.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Accept pacing (spec §2.1): burst, then one per interval.
const ACCEPT_BURST: u32 = 20;
const ACCEPT_INTERVAL: Duration = Duration::from_millis(50);
/// Connections to the mesh task: messages (awaited: backpressure onto the sockets).
pub const TO_MESH_QUEUE: usize = 256;
/// ... and their bytes: a few maximal topology messages.
pub const TO_MESH_BYTES: usize = 64 << 20;
/// The mesh task to one connection: messages (`try_send`: dropped and counted when full).
pub const TO_CONN_QUEUE: usize = 64;
/// ... and their bytes, per connection.
pub const TO_CONN_BYTES: usize = 16 << 20;
/// API and data plane to the mesh task (awaited; small messages, control-plane rate).
const COMMAND_QUEUE: usize = 16;
/// Events queued for one application channel (its task drains them).
pub const APP_QUEUE: usize = 256;
/// ... and their bytes: a few maximal gossip payloads.
pub const APP_BYTES: usize = 8 << 20;

/// What the mesh needs.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// Our peer name (the bridge MAC).
    pub name: PeerName,
    pub nickname: String,
    /// Random non-zero UID chosen at start.
    pub uid: u64,
    /// Listen (and default dial) port, normally 6783.
    pub port: u16,
    /// Mesh password (`WEAVE_PASSWORD`); `None` or empty = unencrypted.
    pub password: Option<String>,
    /// Peers given at launch (`host[:port]`).
    pub peers: Vec<String>,
    pub discovery: bool,
    /// 0 = unlimited.
    pub conn_limit: usize,
    pub kdf: KdfParams,
    /// `--trusted-subnets` (spec §2.9): we trust a connection whose remote TCP address is in one
    /// of these and say so in the handshake; its UDP goes in plaintext when both ends trust
    /// each other (TCP stays encrypted).
    pub trusted_subnets: Vec<Ipv4Cidr>,
    /// Connections stay `pending` until the data plane reports their forwarder established
    /// ([`MeshHandle::overlay_status`]). `false` is for a mesh without a data plane (tests):
    /// connections then count as established as soon as they are added.
    pub await_overlay: bool,
}

impl MeshConfig {
    fn encrypted(&self) -> bool {
        self.password.as_ref().is_some_and(|p| !p.is_empty())
    }
}

#[derive(Debug)]
enum MeshCommand {
    Connect {
        peers: Vec<DirectPeer>,
        replace: bool,
    },
    Forget {
        peers: Vec<String>,
    },
    SendOverlay {
        to: PeerName,
        index: u8,
        body: Vec<u8>,
    },
    Overlay(OverlayStatus),
    OpenChannel {
        channel: &'static str,
        tx: queue::Sender<AppEvent>,
    },
    AppSend {
        channel: &'static str,
        send: AppSend,
    },
    Reject {
        from: PeerName,
        reason: String,
    },
}

/// Commands for the mesh task (API and sleeve side).
#[derive(Debug, Clone)]
pub struct MeshHandle {
    tx: mpsc::Sender<MeshCommand>,
    port: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("the mesh is not running")]
    Stopped,
    /// One line per bad peer string.
    #[error("{}", .0.join("\n"))]
    InvalidPeers(Vec<String>),
}

impl MeshHandle {
    /// `POST /connect`: resolve every string, then add them to the direct peers.
    pub async fn connect(&self, peers: &[String], replace: bool) -> Result<(), MeshError> {
        let peers = resolve_peers(peers, self.port)
            .await
            .map_err(MeshError::InvalidPeers)?;
        self.tx
            .send(MeshCommand::Connect { peers, replace })
            .await
            .map_err(|_| MeshError::Stopped)
    }

    /// `POST /forget`.
    pub async fn forget(&self, peers: &[String]) -> Result<(), MeshError> {
        self.tx
            .send(MeshCommand::Forget {
                peers: peers.to_vec(),
            })
            .await
            .map_err(|_| MeshError::Stopped)
    }

    /// Send an overlay control message to the neighbour `to` (dropped if not connected).
    pub async fn send_overlay(
        &self,
        to: PeerName,
        index: u8,
        body: Vec<u8>,
    ) -> Result<(), MeshError> {
        self.tx
            .send(MeshCommand::SendOverlay { to, index, body })
            .await
            .map_err(|_| MeshError::Stopped)
    }

    /// The data plane's latest view of its forwarders: establishes pending connections and tears
    /// down timed-out ones (only with `await_overlay`; otherwise just the `mtu` attribute).
    pub async fn overlay_status(&self, status: OverlayStatus) -> Result<(), MeshError> {
        self.tx
            .send(MeshCommand::Overlay(status))
            .await
            .map_err(|_| MeshError::Stopped)
    }
}

impl MeshHandle {
    /// Run an application on `channel`: its events arrive on [`AppChannel::events`], the list of
    /// peers first. Opening a channel again hands it to the new opener (the old queue ends).
    pub async fn open_channel(&self, channel: &'static str) -> Result<AppChannel, MeshError> {
        let (tx, events) = queue::channel(APP_QUEUE, APP_BYTES);
        self.tx
            .send(MeshCommand::OpenChannel { channel, tx })
            .await
            .map_err(|_| MeshError::Stopped)?;
        Ok(AppChannel {
            channel,
            tx: self.tx.clone(),
            events,
        })
    }
}

/// An application's end of its channel (see [`crate::mesh::app`]).
#[derive(Debug)]
pub struct AppChannel {
    channel: &'static str,
    tx: mpsc::Sender<MeshCommand>,
    /// Gossip for this channel and changes of the peer list. Bounded: gossip that does not fit
    /// is dropped (the next periodic round repairs it); a peer list waits for room.
    pub events: queue::Receiver<AppEvent>,
}

impl AppChannel {
    pub fn channel(&self) -> &'static str {
        self.channel
    }

    /// Have the node send on this channel (payloads above
    /// [`MAX_GOSSIP_PAYLOAD`] are dropped, logged: no peer would take them).
    pub async fn send(&self, send: AppSend) -> Result<(), MeshError> {
        self.tx
            .send(MeshCommand::AppSend {
                channel: self.channel,
                send,
            })
            .await
            .map_err(|_| MeshError::Stopped)
    }

    /// What `from` delivered was bad: drop that connection (logged with `reason`).
    pub async fn reject(&self, from: PeerName, reason: String) {
        let _ = self.tx.send(MeshCommand::Reject { from, reason }).await;
    }
}

impl Weigh for AppEvent {
    fn weight(&self) -> usize {
        ITEM_OVERHEAD
            + match self {
                AppEvent::Gossip { payload, .. } => payload.len(),
                AppEvent::Peers(p) => p.iter().map(|i| 32 + i.nickname.len()).sum(),
            }
    }
}

/// Does our `--trusted-subnets` list cover `ip` (spec §2.9)? IPv4 only (an IPv4-mapped IPv6
/// address counts as its IPv4 address).
pub fn trusts(subnets: &[Ipv4Cidr], ip: IpAddr) -> bool {
    let v4 = match ip {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4,
            None => return false,
        },
    };
    subnets.iter().any(|c| c.contains(v4))
}

/// Resolve `host[:port]` strings (DNS at connect time, spec §3.7). Errors: one line per string.
pub async fn resolve_peers(specs: &[String], port: u16) -> Result<Vec<DirectPeer>, Vec<String>> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for spec in specs {
        let (host, port, port_given) = match parse_peer_spec(spec, port) {
            Ok(p) => p,
            Err(e) => {
                errors.push(e.to_string());
                continue;
            }
        };
        let looked_up = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map(Iterator::collect::<Vec<SocketAddr>>);
        match looked_up {
            Ok(addrs) => {
                // Prefer IPv4, as Weave's tcp4 dialler.
                match addrs.iter().find(|a| a.is_ipv4()).or(addrs.first()) {
                    Some(addr) => out.push(DirectPeer {
                        spec: spec.clone(),
                        addr: *addr,
                        port_given,
                    }),
                    None => errors.push(format!("lookup {host}: no addresses")),
                }
            }
            Err(e) => errors.push(format!("lookup {host}: {e}")),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// A running mesh.
#[derive(Debug)]
pub struct RunningMesh {
    pub handle: MeshHandle,
    /// For the sleeve shell.
    pub view: watch::Receiver<DataPlaneView>,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
}

impl RunningMesh {
    /// Stop the acceptor and the mesh task (connection tasks end when they next talk to it).
    pub fn abort(&self) {
        for (_, t) in &self.tasks {
            t.abort();
        }
    }

    /// The long-lived tasks, by name, for a supervisor (which then owns stopping them).
    pub fn take_tasks(&mut self) -> Vec<(&'static str, JoinHandle<()>)> {
        std::mem::take(&mut self.tasks)
    }
}

/// Bind the mesh port and start the acceptor and the mesh task. The mesh task publishes into
/// `status` (router part) after every event.
pub async fn start(
    config: MeshConfig,
    status: watch::Sender<StatusSnapshot>,
) -> std::io::Result<RunningMesh> {
    let listener = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], config.port))).await?;
    let mut hs = HandshakeConfig::new(config.name, config.nickname.clone(), PeerUid(config.uid));
    hs.password = config
        .password
        .clone()
        .filter(|p| !p.is_empty())
        .map(String::into_bytes);
    hs.kdf = config.kdf;
    // Argon2id once, now, off the async threads: handshakes then do no expensive work.
    let stretch = hs.clone();
    tokio::task::spawn_blocking(move || stretch.stretched_password())
        .await
        .map_err(std::io::Error::other)?
        .map_err(std::io::Error::other)?;
    let (to_mesh, from_conns) = queue::channel(TO_MESH_QUEUE, TO_MESH_BYTES);
    let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
    let (view_tx, view) = watch::channel(DataPlaneView::default());
    let ctx = Arc::new(ConnCtx {
        hs,
        trusted_subnets: config.trusted_subnets.clone(),
        to_mesh,
    });
    let initial = resolve_peers(&config.peers, config.port).await;
    let initial = match initial {
        Ok(p) => p,
        Err(errors) => {
            for e in errors {
                tracing::warn!(error = %e, "ignoring launch peer");
            }
            // Keep the ones that did resolve.
            let mut ok = Vec::new();
            for spec in &config.peers {
                if let Ok(mut p) = resolve_peers(std::slice::from_ref(spec), config.port).await {
                    ok.append(&mut p);
                }
            }
            ok
        }
    };
    let handle = MeshHandle {
        tx: cmd_tx,
        port: config.port,
    };
    let acceptor = tokio::spawn(accept_loop(listener, ctx.clone()));
    let mesh = Mesh::new(config, ctx, status, view_tx, initial);
    let task = tokio::spawn(mesh.run(from_conns, cmd_rx));
    Ok(RunningMesh {
        handle,
        view,
        tasks: vec![("mesh listener", acceptor), ("mesh", task)],
    })
}

/// GCRA pacing: given the theoretical arrival time `tat`, return the new one and how long to
/// wait before accepting again (0 while within the burst).
fn pace(tat: Instant, now: Instant, interval: Duration, burst: u32) -> (Instant, Duration) {
    let tat = tat.max(now) + interval;
    let allowed = now + interval * burst;
    (tat, tat.saturating_duration_since(allowed))
}

/// Why an inbound connection was refused before its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// [`MAX_PENDING_INBOUND`] handshakes already in progress.
    Global,
    /// [`MAX_PENDING_PER_IP`] handshakes already in progress from this address.
    PerIp,
}

/// Admission of inbound connections to the handshake: a global cap and a per-source-address cap
/// on handshakes in progress. Pure bookkeeping; the shell holds a [`PendingSlot`] per admitted
/// connection, which gives the slot back when dropped.
#[derive(Debug)]
pub struct PendingLimits {
    global_max: usize,
    per_ip_max: usize,
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

impl PendingLimits {
    pub fn new(global_max: usize, per_ip_max: usize) -> Self {
        PendingLimits {
            global_max,
            per_ip_max,
            total: 0,
            per_ip: HashMap::new(),
        }
    }

    /// Take a slot for a handshake from `ip`.
    pub fn try_admit(&mut self, ip: IpAddr) -> Result<(), Refusal> {
        if self.total >= self.global_max {
            return Err(Refusal::Global);
        }
        let n = self.per_ip.entry(ip).or_insert(0);
        if *n >= self.per_ip_max {
            return Err(Refusal::PerIp);
        }
        *n += 1;
        self.total += 1;
        Ok(())
    }

    /// Give back a slot taken by [`try_admit`](Self::try_admit).
    pub fn release(&mut self, ip: IpAddr) {
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
            self.total = self.total.saturating_sub(1);
        }
    }

    /// Handshakes in progress.
    pub fn pending(&self) -> usize {
        self.total
    }
}

/// An admitted inbound connection's handshake slot; released when dropped (handshake over, or
/// the task ended any other way).
struct PendingSlot {
    limits: Arc<Mutex<PendingLimits>>,
    ip: IpAddr,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        // Poisoning only means a panic elsewhere mid-update; the counts are still usable.
        let mut l = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        l.release(self.ip);
    }
}

async fn accept_loop(listener: TcpListener, ctx: Arc<ConnCtx>) {
    let mut tat = Instant::now();
    let limits = Arc::new(Mutex::new(PendingLimits::new(
        MAX_PENDING_INBOUND,
        MAX_PENDING_PER_IP,
    )));
    let (mut refused, mut last_log): (u64, Option<Instant>) = (0, None);
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "mesh accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let admitted = limits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .try_admit(addr.ip());
        if let Err(why) = admitted {
            // Closed at once (dropping the stream): no task, no buffer, no pacing delay.
            drop(stream);
            refused += 1;
            let now = Instant::now();
            if last_log.is_none_or(|t| now.saturating_duration_since(t) >= REFUSAL_LOG_INTERVAL) {
                tracing::debug!(
                    %addr,
                    reason = ?why,
                    refused,
                    "refusing inbound connections: too many handshakes in progress"
                );
                last_log = Some(now);
                refused = 0;
            }
            continue;
        }
        let slot = PendingSlot {
            limits: limits.clone(),
            ip: addr.ip(),
        };
        tokio::spawn(connection(
            next_id(),
            stream,
            addr,
            false,
            ctx.clone(),
            Some(slot),
        ));
        let (next, wait) = pace(tat, Instant::now(), ACCEPT_INTERVAL, ACCEPT_BURST);
        tat = next;
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Shared by every connection task.
struct ConnCtx {
    hs: HandshakeConfig,
    trusted_subnets: Vec<Ipv4Cidr>,
    to_mesh: queue::Sender<ToMesh>,
}

#[derive(Debug)]
enum ToConn {
    Send(Message),
    Close(String),
}

struct Registration {
    id: u64,
    remote: Peer,
    addr: SocketAddr,
    outbound: bool,
    conn_uid: u64,
    udp_encrypted: bool,
    keys: Option<UdpKeys>,
    tx: queue::Sender<ToConn>,
    reply: oneshot::Sender<Result<(), String>>,
}

enum ToMesh {
    AttemptFailed {
        addr: SocketAddr,
        error: String,
        permanent: bool,
    },
    Register(Box<Registration>),
    UdpKeys {
        id: u64,
        remote: PeerName,
        keys: UdpKeys,
    },
    Received {
        id: u64,
        from: PeerName,
        msg: Message,
    },
    Closed {
        id: u64,
        remote: PeerName,
        error: Option<String>,
    },
}

/// Fixed cost of a queued item besides its payload (enum, strings' headers, allocation).
const ITEM_OVERHEAD: usize = 64;

/// Bytes a message holds.
fn message_weight(msg: &Message) -> usize {
    ITEM_OVERHEAD
        + match msg {
            Message::OverlayControl { body, .. } => body.len(),
            other => other
                .gossip()
                .map_or(0, |(channel, payload)| channel.len() + payload.len()),
        }
}

impl Weigh for ToConn {
    fn weight(&self) -> usize {
        match self {
            ToConn::Send(msg) => message_weight(msg),
            ToConn::Close(reason) => ITEM_OVERHEAD + reason.len(),
        }
    }
}

impl Weigh for ToMesh {
    fn weight(&self) -> usize {
        match self {
            ToMesh::Received { msg, .. } => message_weight(msg),
            ToMesh::AttemptFailed { error, .. } => ITEM_OVERHEAD + error.len(),
            ToMesh::Closed { error, .. } => ITEM_OVERHEAD + error.as_ref().map_or(0, String::len),
            ToMesh::Register(reg) => ITEM_OVERHEAD + reg.remote.nickname.len(),
            ToMesh::UdpKeys { .. } => ITEM_OVERHEAD,
        }
    }
}

/// Non-topology gossip above [`MAX_GOSSIP_PAYLOAD`] is dropped where it is decoded (the
/// connection task), before it takes room in the mesh task's queue. Returns the message if it
/// may pass.
fn within_gossip_cap(msg: Message, remote: PeerName) -> Option<Message> {
    let Some((channel, len)) = msg.gossip().map(|(c, p)| (c, p.len())) else {
        return Some(msg);
    };
    if channel == TOPOLOGY_CHANNEL || len <= MAX_GOSSIP_PAYLOAD {
        return Some(msg);
    }
    static DROPPED: AtomicU64 = AtomicU64::new(0);
    let dropped = DROPPED.fetch_add(1, Ordering::Relaxed) + 1;
    tracing::debug!(%remote, channel, len, dropped, "dropping oversized gossip");
    None
}

#[derive(Debug, thiserror::Error)]
enum ConnFailure {
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("connection closed by the remote")]
    Eof,
}

impl ConnFailure {
    fn permanent(&self) -> bool {
        matches!(self, ConnFailure::Handshake(e) if e.is_permanent())
    }
}

async fn write_all_hs(hs: &mut Handshake, stream: &mut TcpStream) -> std::io::Result<()> {
    while let Some(bytes) = hs.poll_transmit() {
        stream.write_all(&bytes).await?;
    }
    Ok(())
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
        None => std::future::pending().await,
    }
}

/// Run the handshake on `stream` with the peer at `addr`.
async fn handshake(
    stream: &mut TcpStream,
    addr: SocketAddr,
    outbound: bool,
    ctx: &ConnCtx,
) -> Result<Established, ConnFailure> {
    let trust = trusts(&ctx.trusted_subnets, addr.ip());
    let mut hs = Handshake::with_trust(&ctx.hs, outbound, trust, Instant::now(), &mut OsRng);
    write_all_hs(&mut hs, stream).await?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = tokio::select! {
            r = stream.read(&mut buf) => r?,
            () = sleep_until_opt(hs.poll_timeout()) => {
                hs.handle_timeout(Instant::now())?;
                continue;
            }
        };
        if n == 0 {
            return Err(ConnFailure::Eof);
        }
        let result = hs.on_bytes(Instant::now(), buf.get(..n).unwrap_or_default());
        // Also after an error: the handshake may have queued an Abort for the remote.
        let flushed = write_all_hs(&mut hs, stream).await;
        match result {
            Ok(Progress::Pending) => flushed?,
            Ok(Progress::Established(est)) => {
                flushed?;
                return Ok(*est);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// One mesh TCP connection, from the handshake to its end. `slot`: an inbound connection's
/// handshake slot, given back as soon as the handshake is over.
async fn connection(
    id: u64,
    mut stream: TcpStream,
    addr: SocketAddr,
    outbound: bool,
    ctx: Arc<ConnCtx>,
    slot: Option<PendingSlot>,
) {
    let _ = stream.set_nodelay(true);
    let result = handshake(&mut stream, addr, outbound, &ctx).await;
    drop(slot);
    let est = match result {
        Ok(est) => est,
        Err(e) => {
            // Inbound garbage (not our protocol, or cut off) is what a flood sends: debug only,
            // so it cannot fill the logs. Everything else stays visible.
            let noise = !outbound
                && matches!(
                    e,
                    ConnFailure::Eof
                        | ConnFailure::Io(_)
                        | ConnFailure::Handshake(
                            HandshakeError::BadMagic | HandshakeError::Malformed(_)
                        )
                );
            if noise {
                tracing::debug!(
                    "{}[{addr}]: connection shutting down due to error during handshake: {e}",
                    arrow(outbound)
                );
            } else {
                tracing::warn!(
                    "{}[{addr}]: connection shutting down due to error during handshake: {e}",
                    arrow(outbound)
                );
            }
            if outbound {
                let _ = ctx
                    .to_mesh
                    .send(ToMesh::AttemptFailed {
                        addr,
                        error: e.to_string(),
                        permanent: e.permanent(),
                    })
                    .await;
            }
            return;
        }
    };
    let remote = est.remote.clone();
    let who = format!(
        "{}[{addr}|{}({})]",
        arrow(outbound),
        remote.name,
        remote.nickname
    );
    let mut conn = match Conn::new(&est, ConnConfig::from_env(), Instant::now(), OsRng) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("{who}: connection shutting down due to error: {e}");
            return;
        }
    };
    let (tx, mut rx) = queue::channel(TO_CONN_QUEUE, TO_CONN_BYTES);
    let (reply_tx, reply_rx) = oneshot::channel();
    let reg = Registration {
        id,
        remote: remote.clone(),
        addr,
        outbound,
        conn_uid: est.conn_uid,
        udp_encrypted: est.udp_encrypted(),
        keys: est.keys.as_ref().map(|k| UdpKeys {
            epoch: k.epoch,
            send: k.udp_send,
            recv: k.udp_recv,
        }),
        tx,
        reply: reply_tx,
    };
    if ctx
        .to_mesh
        .send(ToMesh::Register(Box::new(reg)))
        .await
        .is_err()
    {
        return;
    }
    let mut closing = CloseGuard {
        id,
        remote: remote.name,
        to_mesh: Some(ctx.to_mesh.clone()),
    };
    match reply_rx.await {
        Ok(Ok(())) => tracing::info!("{who}: connection added"),
        Ok(Err(reason)) => {
            tracing::warn!("{who}: connection shutting down due to error: {reason}");
            return;
        }
        Err(_) => return,
    }
    let error = drive(&mut conn, &mut stream, &mut rx, id, remote.name, &ctx).await;
    match &error {
        Some(e) => tracing::warn!("{who}: connection shutting down due to error: {e}"),
        None => tracing::info!("{who}: connection closed"),
    }
    closing.to_mesh = None;
    let _ = ctx
        .to_mesh
        .send(ToMesh::Closed {
            id,
            remote: remote.name,
            error,
        })
        .await;
}

/// Tells the mesh task that a registered connection is gone should its task end any other way
/// than through its last line (a panic, or an early return): otherwise the mesh would keep a
/// dead connection, a black hole for that peer, until the peer's heartbeats time out.
struct CloseGuard {
    id: u64,
    remote: PeerName,
    /// `None` once the task reports its end itself.
    to_mesh: Option<queue::Sender<ToMesh>>,
}

impl Drop for CloseGuard {
    fn drop(&mut self) {
        let Some(to_mesh) = self.to_mesh.take() else {
            return;
        };
        let why = if std::thread::panicking() {
            "connection task panicked"
        } else {
            "connection task ended"
        };
        // Cannot await here; the queue bound only refuses under a flood of messages, and then
        // the heartbeat timeout still removes the connection.
        let _ = to_mesh.try_send(ToMesh::Closed {
            id: self.id,
            remote: self.remote,
            error: Some(why.to_string()),
        });
    }
}

/// The established connection's loop; returns the error that ended it (`None`: closed by us).
async fn drive(
    conn: &mut Conn<OsRng>,
    stream: &mut TcpStream,
    rx: &mut queue::Receiver<ToConn>,
    id: u64,
    remote: PeerName,
    ctx: &ConnCtx,
) -> Option<String> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Events first: Conn::new may already have some from leftover bytes.
        while let Some(ev) = conn.poll_event() {
            let msg = match ev {
                ConnEvent::Message(Message::Heartbeat) => continue,
                ConnEvent::Message(Message::Unknown(tag)) => {
                    tracing::debug!(tag, %remote, "ignoring message with unknown tag");
                    continue;
                }
                ConnEvent::Message(msg) => match within_gossip_cap(msg, remote) {
                    Some(msg) => ToMesh::Received {
                        id,
                        from: remote,
                        msg,
                    },
                    None => continue,
                },
                ConnEvent::NewUdpKeys(keys) => ToMesh::UdpKeys { id, remote, keys },
            };
            if ctx.to_mesh.send(msg).await.is_err() {
                return Some("router shutting down".into());
            }
        }
        while let Some(bytes) = conn.poll_transmit() {
            if let Err(e) = stream.write_all(&bytes).await {
                return Some(e.to_string());
            }
        }
        let deadline = tokio::time::Instant::from_std(conn.poll_timeout());
        tokio::select! {
            r = stream.read(&mut buf) => match r {
                Ok(0) => return Some(ConnFailure::Eof.to_string()),
                Ok(n) => {
                    if let Err(e) = conn.on_bytes(Instant::now(), buf.get(..n).unwrap_or_default()) {
                        return Some(e.to_string());
                    }
                }
                Err(e) => return Some(e.to_string()),
            },
            cmd = rx.recv() => match cmd {
                Some(ToConn::Send(msg)) => {
                    if let Err(e) = conn.send(&msg) {
                        return Some(e.to_string());
                    }
                }
                Some(ToConn::Close(reason)) => return Some(reason),
                None => return None,
            },
            () = tokio::time::sleep_until(deadline) => {
                if let Err(e) = conn.handle_timeout(Instant::now()) {
                    return Some(e.to_string());
                }
            }
        }
    }
}

/// The mesh task: the [`Node`] on tokio's clock, the queues of the live connections and of the
/// application channels, the `watch`es of the status and the data-plane view.
struct Mesh {
    config: MeshConfig,
    ctx: Arc<ConnCtx>,
    node: Node,
    /// Live connections' queues, by connection id (the node says which id a peer's is).
    conns: HashMap<u64, queue::Sender<ToConn>>,
    /// Application channels' queues, and a peer list still to deliver (the queue was full).
    apps: BTreeMap<&'static str, AppQueue>,
    status: watch::Sender<StatusSnapshot>,
    view: watch::Sender<DataPlaneView>,
}

struct AppQueue {
    tx: queue::Sender<AppEvent>,
    peers_due: Option<AppEvent>,
}

impl Mesh {
    fn new(
        config: MeshConfig,
        ctx: Arc<ConnCtx>,
        status: watch::Sender<StatusSnapshot>,
        view: watch::Sender<DataPlaneView>,
        initial: Vec<DirectPeer>,
    ) -> Self {
        let node_config = NodeConfig {
            port: config.port,
            discovery: config.discovery,
            conn_limit: config.conn_limit,
            encrypted: config.encrypted(),
            await_overlay: config.await_overlay,
            ..NodeConfig::new(config.name, config.nickname.clone(), config.uid)
        };
        let node = Node::new(node_config, initial, Box::new(OsRng), Instant::now());
        Mesh {
            config,
            ctx,
            node,
            conns: HashMap::new(),
            apps: BTreeMap::new(),
            status,
            view,
        }
    }

    async fn run(
        mut self,
        mut from_conns: queue::Receiver<ToMesh>,
        mut commands: mpsc::Receiver<MeshCommand>,
    ) {
        loop {
            self.flush();
            let wake = tokio::time::Instant::from_std(self.node.poll_timeout());
            tokio::select! {
                Some(m) = from_conns.recv() => self.on_conn(m),
                Some(c) = commands.recv() => self.on_command(c),
                () = tokio::time::sleep_until(wake) => self.node.handle_timeout(Instant::now()),
            }
        }
    }

    /// Carry out what the node asked for, then publish the status.
    fn flush(&mut self) {
        let mut view_changed = false;
        while let Some(ev) = self.node.poll_event() {
            match ev {
                Event::Dial(addr) => self.dial(addr),
                Event::Close { id, reason, .. } => {
                    // Dropping the queue ends the connection task too, should the close not
                    // fit in it.
                    if let Some(tx) = self.conns.remove(&id) {
                        if let Some(reason) = reason {
                            let _ = tx.try_send(ToConn::Close(reason));
                        }
                    }
                }
                Event::ViewChanged => view_changed = true,
            }
        }
        while let Some((to, msg)) = self.node.poll_transmit() {
            self.send_to(to, msg);
        }
        while let Some((channel, ev)) = self.node.poll_app() {
            if let Some(app) = self.apps.get_mut(channel) {
                let peers = matches!(ev, AppEvent::Peers(_));
                if peers && app.peers_due.is_some() {
                    // Still behind: this newer list replaces the one waiting.
                    app.peers_due = Some(ev);
                    continue;
                }
                let kept = peers.then(|| ev.clone());
                match app.tx.try_send(ev) {
                    Ok(()) => {}
                    Err(queue::TrySendError::Closed) => {
                        self.apps.remove(channel);
                        self.node.unregister_channel(channel);
                    }
                    Err(queue::TrySendError::Full) => {
                        // Gossip is repaired by the next periodic round; the peer list must
                        // not be lost, so it waits for room.
                        tracing::debug!(
                            channel,
                            dropped = app.tx.dropped(),
                            "application queue full"
                        );
                        if kept.is_some() {
                            app.peers_due = kept;
                        }
                    }
                }
            }
        }
        self.retry_peer_lists();
        if view_changed {
            let v = self.node.view().clone();
            self.view.send_if_modified(|old| {
                let changed = *old != v;
                *old = v;
                changed
            });
        }
        self.publish();
    }

    /// Peer lists that did not fit in their application's queue: try again.
    fn retry_peer_lists(&mut self) {
        for app in self.apps.values_mut() {
            if let Some(ev) = app.peers_due.take() {
                if let Err(queue::TrySendError::Full) = app.tx.try_send(ev.clone()) {
                    app.peers_due = Some(ev);
                }
            }
        }
    }

    fn dial(&self, addr: SocketAddr) {
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            let error = match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    connection(next_id(), stream, addr, true, ctx, None).await;
                    return;
                }
                Ok(Err(e)) => format!("dial tcp4 {addr}: {e}"),
                Err(_) => format!("dial tcp4 {addr}: i/o timeout"),
            };
            tracing::warn!("->[{addr}]: connection shutting down due to error: {error}");
            let _ = ctx
                .to_mesh
                .send(ToMesh::AttemptFailed {
                    addr,
                    error,
                    permanent: false,
                })
                .await;
        });
    }

    fn send_to(&self, to: PeerName, msg: Message) {
        let Some(tx) = self.node.conn_id(to).and_then(|id| self.conns.get(&id)) else {
            return;
        };
        if tx.try_send(ToConn::Send(msg)).is_err() {
            tracing::debug!(
                peer = %to,
                dropped = tx.dropped(),
                queued_bytes = tx.queued_bytes(),
                "connection queue full: message dropped"
            );
        }
    }

    fn on_command(&mut self, cmd: MeshCommand) {
        let now = Instant::now();
        match cmd {
            MeshCommand::Connect { peers, replace } => self.node.connect(now, peers, replace),
            MeshCommand::Forget { peers } => self.node.forget(now, &peers),
            MeshCommand::SendOverlay { to, index, body } => {
                self.node.send_overlay(to, index, body);
            }
            MeshCommand::Overlay(status) => self.node.overlay(now, &status),
            MeshCommand::OpenChannel { channel, tx } => {
                // A second opener (an application task restarted by its supervisor) takes over:
                // the previous receiver sees its queue end.
                self.apps.insert(
                    channel,
                    AppQueue {
                        tx,
                        peers_due: None,
                    },
                );
                self.node.unregister_channel(channel);
                self.node.register_channel(channel);
            }
            MeshCommand::AppSend { channel, send } => self.node.app_send(now, channel, send),
            MeshCommand::Reject { from, reason } => self.node.reject(now, from, reason),
        }
    }

    fn on_conn(&mut self, m: ToMesh) {
        let now = Instant::now();
        match m {
            ToMesh::AttemptFailed {
                addr,
                error,
                permanent,
            } => self.node.attempt_failed(now, addr, error, permanent),
            ToMesh::Register(reg) => {
                let reg = *reg;
                let result = self.node.register(
                    now,
                    NewConn {
                        id: reg.id,
                        remote: reg.remote,
                        addr: reg.addr,
                        outbound: reg.outbound,
                        conn_uid: reg.conn_uid,
                        udp_encrypted: reg.udp_encrypted,
                        keys: reg.keys,
                    },
                );
                if result.is_ok() {
                    self.conns.insert(reg.id, reg.tx);
                }
                let _ = reg.reply.send(result);
            }
            ToMesh::UdpKeys { id, remote, keys } => self.node.udp_keys(id, remote, keys),
            ToMesh::Received { id, from, msg } => self.node.received(now, id, from, msg),
            ToMesh::Closed { id, remote, error } => self.node.closed(now, id, remote, error),
        }
    }

    /// Publish the router part of the status.
    fn publish(&mut self) {
        let NodeStatus {
            peers,
            unicast_routes,
            broadcast_routes,
            connections,
            targets,
            termination_count: terminations,
        } = self.node.status(Instant::now(), SystemTime::now());
        let encryption = self.config.encrypted();
        let discovery = self.config.discovery;
        let trusted: Vec<String> = self
            .config
            .trusted_subnets
            .iter()
            .map(ToString::to_string)
            .collect();
        self.status.send_if_modified(|s| {
            let r = &mut s.router;
            // Routes follow from peers and connections: no need to compare them.
            let changed = r.encryption != encryption
                || r.peer_discovery != discovery
                || r.peers != peers
                || r.connections != connections
                || r.targets != targets
                || r.termination_count != terminations
                || r.trusted_subnets != trusted;
            r.protocol_min_version = crate::mesh::handshake::PROTOCOL_MIN_VERSION;
            r.protocol_max_version = crate::mesh::handshake::PROTOCOL_MAX_VERSION;
            r.encryption = encryption;
            r.peer_discovery = discovery;
            r.peers = peers;
            r.unicast_routes = unicast_routes;
            r.broadcast_routes = broadcast_routes;
            r.connections = connections;
            r.targets = targets;
            r.termination_count = terminations;
            r.trusted_subnets = trusted;
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::ConnectionState;
    use serde_json::{json, Value};

    #[test]
    fn accept_pacing() {
        let start = Instant::now();
        let mut tat = start;
        // The burst passes without waiting.
        for _ in 0..ACCEPT_BURST {
            let (next, wait) = pace(tat, start, ACCEPT_INTERVAL, ACCEPT_BURST);
            assert!(wait.is_zero());
            tat = next;
        }
        // Then one per interval.
        let (next, wait) = pace(tat, start, ACCEPT_INTERVAL, ACCEPT_BURST);
        assert_eq!(wait, ACCEPT_INTERVAL);
        // Time passing refills.
        let later = start + ACCEPT_INTERVAL * 30;
        let (_, wait) = pace(next, later, ACCEPT_INTERVAL, ACCEPT_BURST);
        assert!(wait.is_zero());
    }

    #[test]
    fn gossip_cap_spares_topology_only() {
        let remote = PeerName::from_u64(2);
        let gossip = |channel: &str, len: usize| Message::Gossip {
            channel: channel.into(),
            src: remote,
            payload: vec![0; len],
        };
        assert!(within_gossip_cap(gossip("IPallocation", MAX_GOSSIP_PAYLOAD), remote).is_some());
        assert!(
            within_gossip_cap(gossip("IPallocation", MAX_GOSSIP_PAYLOAD + 1), remote).is_none()
        );
        assert!(within_gossip_cap(gossip(TOPOLOGY_CHANNEL, 4 << 20), remote).is_some());
        let unicast = Message::GossipUnicast {
            channel: "nameserver".into(),
            src: remote,
            dst: PeerName::from_u64(1),
            payload: vec![0; MAX_GOSSIP_PAYLOAD + 1],
        };
        assert!(within_gossip_cap(unicast, remote).is_none());
        let broadcast = Message::GossipBroadcast {
            channel: "nameserver".into(),
            src: remote,
            payload: vec![0; MAX_GOSSIP_PAYLOAD + 1],
        };
        assert!(within_gossip_cap(broadcast, remote).is_none());
        let overlay = Message::OverlayControl {
            index: 0,
            body: vec![0; MAX_GOSSIP_PAYLOAD + 1],
        };
        assert!(within_gossip_cap(overlay, remote).is_some());
        // What a queued message weighs follows its payload.
        let heavy = ToConn::Send(gossip(TOPOLOGY_CHANNEL, 4 << 20));
        assert!(heavy.weight() > 4 << 20);
        assert!(ToConn::Send(Message::Heartbeat).weight() < 1024);
    }

    /// A connection task that panics still tells the mesh its connection is gone.
    #[tokio::test]
    async fn panicking_connection_task_reports_its_end() {
        let (tx, mut rx) = queue::channel::<ToMesh>(4, 1 << 16);
        let remote = PeerName::from_u64(9);
        let task = tokio::spawn(async move {
            let _guard = CloseGuard {
                id: 3,
                remote,
                to_mesh: Some(tx),
            };
            let n = "x".len();
            assert_eq!(n, 2, "a bug in the connection task");
        });
        assert!(task.await.is_err_and(|e| e.is_panic()));
        match rx.recv().await {
            Some(ToMesh::Closed {
                id: 3,
                remote: r,
                error: Some(why),
            }) => {
                assert_eq!(r, remote);
                assert_eq!(why, "connection task panicked");
            }
            _ => panic!("expected Closed"),
        }
        // A disarmed guard says nothing (the task reported its end itself).
        let (tx, mut rx) = queue::channel::<ToMesh>(4, 1 << 16);
        drop(CloseGuard {
            id: 4,
            remote,
            to_mesh: None,
        });
        drop(tx);
        assert!(rx.recv().await.is_none());
    }

    #[test]
    fn trusted_subnet_membership() {
        let subnets = crate::addr::parse_cidr_list("10.0.0.0/8,192.0.2.0/24").expect("subnets");
        assert!(trusts(&subnets, "10.9.8.7".parse().expect("ip")));
        assert!(trusts(&subnets, "192.0.2.11".parse().expect("ip")));
        assert!(!trusts(&subnets, "192.0.3.11".parse().expect("ip")));
        assert!(trusts(&subnets, "::ffff:10.1.1.1".parse().expect("ip")));
        assert!(!trusts(&subnets, "fe80::1".parse().expect("ip")));
        assert!(!trusts(&[], "10.9.8.7".parse().expect("ip")));
    }

    #[tokio::test]
    async fn resolve_peer_strings() {
        let ok = resolve_peers(&["127.0.0.1".into(), "127.0.0.1:7000".into()], 6783)
            .await
            .expect("resolves");
        assert_eq!(ok[0].addr, "127.0.0.1:6783".parse().expect("addr"));
        assert!(!ok[0].port_given);
        assert_eq!(ok[1].addr, "127.0.0.1:7000".parse().expect("addr"));
        assert!(ok[1].port_given);
        let err = resolve_peers(&["bad host".into()], 6783)
            .await
            .expect_err("invalid");
        assert_eq!(
            err,
            vec!["invalid peer name \"bad host\", should be host[:port]"]
        );
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port")
    }

    fn mesh_config(n: u64, port: u16, password: &str, peers: Vec<String>) -> MeshConfig {
        MeshConfig {
            name: PeerName::from_u64(n),
            nickname: format!("node{n}"),
            uid: n * 1000 + 7,
            port,
            password: Some(password.to_string()),
            peers,
            discovery: true,
            conn_limit: 10,
            kdf: KdfParams::INSECURE_FAST,
            trusted_subnets: Vec::new(),
            await_overlay: false,
        }
    }

    fn snapshot(n: u64, port: u16) -> StatusSnapshot {
        StatusSnapshot {
            ready: true,
            failed: None,
            version: "test".into(),
            router: crate::status::RouterStatus::alone(
                &PeerName::from_u64(n).to_string(),
                &format!("node{n}"),
                port,
                n * 1000 + 7,
                0,
            ),
            proxy: None,
        }
    }

    async fn wait_for(
        rx: &mut watch::Receiver<StatusSnapshot>,
        what: &str,
        cond: impl Fn(&StatusSnapshot) -> bool,
    ) {
        let waited = tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|s| cond(s)))
            .await
            .is_ok_and(|r| r.is_ok());
        assert!(waited, "{what}: {:#?}", rx.borrow().router);
    }

    #[test]
    fn pending_limits() {
        let (x, y): (IpAddr, IpAddr) = (
            "10.0.0.1".parse().expect("ip"),
            "10.0.0.2".parse().expect("ip"),
        );
        let mut l = PendingLimits::new(3, 2);
        assert_eq!(l.try_admit(x), Ok(()));
        assert_eq!(l.try_admit(x), Ok(()));
        assert_eq!(l.try_admit(x), Err(Refusal::PerIp));
        assert_eq!(l.try_admit(y), Ok(()));
        assert_eq!(l.try_admit(y), Err(Refusal::Global));
        assert_eq!(l.pending(), 3);
        l.release(x);
        assert_eq!(l.try_admit(y), Ok(()));
        assert_eq!(l.try_admit(x), Err(Refusal::Global));
        // Releasing an address that holds nothing changes nothing.
        l.release("10.9.9.9".parse().expect("ip"));
        assert_eq!(l.pending(), 3);
        for ip in [x, y, y] {
            l.release(ip);
        }
        assert_eq!(l.pending(), 0);
        assert_eq!(l.try_admit(x), Ok(()));
    }

    /// Stalled handshakes (a valid header and Hello, then silence) from the same address as a
    /// real peer fill that address's inbound slots: the listener refuses the peer's own dial,
    /// yet the two connect through the listener's outbound dial, which takes no inbound slot.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stalled_handshakes_do_not_stop_outbound_dials() {
        let (pa, pb) = (free_port(), free_port());
        let (tx_a, mut rx_a) = watch::channel(snapshot(1, pa));
        let (tx_b, _rx_b) = watch::channel(snapshot(2, pb));
        let _a = start(
            mesh_config(1, pa, "pw", vec![format!("127.0.0.1:{pb}")]),
            tx_a,
        )
        .await
        .expect("mesh a");
        let mut stalled = Vec::new();
        let cfg = crate::mesh::handshake::tests::config(9, Some("pw"));
        for _ in 0..(MAX_PENDING_PER_IP + 20) {
            let mut s = TcpStream::connect(("127.0.0.1", pa))
                .await
                .expect("connect");
            let mut hs = Handshake::new(&cfg, true, Instant::now(), &mut OsRng);
            while let Some(b) = hs.poll_transmit() {
                // The refused ones may already be closed.
                let _ = s.write_all(&b).await;
            }
            stalled.push(s);
        }
        // The refused connections are closed by the listener; the admitted ones stay open.
        let mut open = 0;
        for s in &mut stalled {
            let mut buf = [0u8; 1024];
            let closed = matches!(
                tokio::time::timeout(Duration::from_millis(500), async {
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return true,
                            Ok(_) => {}
                        }
                    }
                })
                .await,
                Ok(true)
            );
            if !closed {
                open += 1;
            }
        }
        assert_eq!(
            open, MAX_PENDING_PER_IP,
            "only the per-address budget is admitted"
        );
        let b = start(mesh_config(2, pb, "pw", vec![]), tx_b)
            .await
            .expect("mesh b");
        wait_for(&mut rx_a, "a connected to b by its own dial", |s| {
            s.router.connections.len() == 1
                && s.router.connections[0].outbound
                && s.router.connections[0].state == ConnectionState::Established
        })
        .await;
        b.abort();
    }

    /// Two real meshes over loopback TCP: handshake, registration, gossip and status; then a
    /// third with the wrong password is refused with its reason.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn meshes_on_loopback() {
        let (pa, pb, pc) = (free_port(), free_port(), free_port());
        let (tx_a, mut rx_a) = watch::channel(snapshot(1, pa));
        let (tx_b, mut rx_b) = watch::channel(snapshot(2, pb));
        let mut a = start(mesh_config(1, pa, "pw", vec![]), tx_a)
            .await
            .expect("mesh a");
        let b = start(
            mesh_config(2, pb, "pw", vec![format!("127.0.0.1:{pa}")]),
            tx_b,
        )
        .await
        .expect("mesh b");
        let connected = |s: &StatusSnapshot| {
            s.router.peers.len() == 2
                && s.router.peers.iter().all(|p| p.connections.len() == 1)
                && s.router.connections.len() == 1
                && s.router.connections[0].state == ConnectionState::Established
        };
        wait_for(&mut rx_a, "a connected", connected).await;
        wait_for(&mut rx_b, "b connected", connected).await;
        let b_conn = rx_b.borrow().router.connections[0].clone();
        assert!(b_conn.outbound);
        assert_eq!(b_conn.address, format!("127.0.0.1:{pa}"));
        assert!(b_conn
            .info
            .starts_with("encrypted   sleeve 00:00:00:00:00:01(node1)"));
        assert!(rx_b.borrow().router.encryption);
        assert_eq!(
            rx_b.borrow().router.targets,
            vec![format!("127.0.0.1:{pa}")]
        );
        // The data plane's view of the connection.
        let link = next_link(&mut a.view, PeerName::from_u64(2), None).await;
        assert!(!link.outbound && link.udp_encrypted);
        assert_eq!(link.keys.map(|k| k.epoch), Some(0));

        // Wrong password: refused, with the reason on the dialler's target.
        let (tx_c, mut rx_c) = watch::channel(snapshot(3, pc));
        let c = start(
            mesh_config(3, pc, "wrong", vec![format!("127.0.0.1:{pa}")]),
            tx_c,
        )
        .await
        .expect("mesh c");
        wait_for(&mut rx_c, "c sees the password mismatch", |s| {
            s.router
                .connections
                .iter()
                .any(|c| c.state == ConnectionState::Failed && c.info.contains("password mismatch"))
        })
        .await;
        assert_eq!(rx_c.borrow().router.peers.len(), 1);

        // Forget, then connect --replace.
        b.handle
            .forget(&[format!("127.0.0.1:{pa}")])
            .await
            .expect("forget");
        wait_for(&mut rx_b, "b forgot a", |s| s.router.targets.is_empty()).await;
        assert_eq!(rx_b.borrow().router.connections.len(), 1, "connection kept");
        b.handle
            .connect(&[format!("127.0.0.1:{pc}")], true)
            .await
            .expect("connect");
        wait_for(&mut rx_b, "b targets c", |s| {
            s.router.targets == vec![format!("127.0.0.1:{pc}")]
        })
        .await;
        let bad = b.handle.connect(&["bad host".into()], false).await;
        assert!(matches!(bad, Err(MeshError::InvalidPeers(_))));
        for m in [&a, &b, &c] {
            m.abort();
        }
    }

    /// Application channels over two real meshes: the peer list first, then a broadcast and a
    /// unicast from a reach b's application; reopening a channel hands it over.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn app_channels_on_loopback() {
        use crate::mesh::app::{AppEvent, AppSend, GossipKind};
        let (pa, pb) = (free_port(), free_port());
        let (tx_a, _rx_a) = watch::channel(snapshot(1, pa));
        let (tx_b, _rx_b) = watch::channel(snapshot(2, pb));
        let a = start(mesh_config(1, pa, "pw", vec![]), tx_a)
            .await
            .expect("mesh a");
        let b = start(
            mesh_config(2, pb, "pw", vec![format!("127.0.0.1:{pa}")]),
            tx_b,
        )
        .await
        .expect("mesh b");
        let ca = a.handle.open_channel("test").await.expect("open a");
        let mut cb = b.handle.open_channel("test").await.expect("open b");
        let met = match next_app_event(&mut cb).await {
            // b may have met a already.
            Some(AppEvent::Peers(p)) => p.len() == 2 && p.iter().all(|i| i.reachable),
            other => panic!("expected the peer list first: {other:?}"),
        };
        if !met {
            loop {
                match next_app_event(&mut cb).await {
                    Some(AppEvent::Peers(p)) if p.len() == 2 && p.iter().all(|i| i.reachable) => {
                        break
                    }
                    Some(AppEvent::Peers(_)) => {}
                    other => panic!("expected peer lists: {other:?}"),
                }
            }
        }
        ca.send(AppSend::Broadcast {
            payload: b"hello".to_vec(),
        })
        .await
        .expect("send");
        ca.send(AppSend::Unicast {
            dst: PeerName::from_u64(2),
            payload: b"you".to_vec(),
        })
        .await
        .expect("send");
        let mut got = Vec::new();
        while got.len() < 2 {
            match next_app_event(&mut cb).await {
                Some(AppEvent::Gossip {
                    kind, src, payload, ..
                }) => {
                    assert_eq!(src, PeerName::from_u64(1));
                    got.push((kind, payload));
                }
                Some(AppEvent::Peers(_)) => {}
                None => panic!("no gossip; got {got:?}"),
            }
        }
        assert_eq!(
            got,
            vec![
                (GossipKind::Broadcast, b"hello".to_vec()),
                (GossipKind::Unicast, b"you".to_vec())
            ]
        );
        // Reopened: the new queue gets the peer list, the old one ends.
        let mut cb2 = b.handle.open_channel("test").await.expect("reopen");
        assert!(matches!(next_app_event(&mut cb2).await, Some(AppEvent::Peers(p)) if p.len() == 2));
        assert!(
            next_app_event(&mut cb).await.is_none(),
            "the old queue ends"
        );
        for m in [&a, &b] {
            m.abort();
        }
    }

    async fn next_app_event(c: &mut AppChannel) -> Option<crate::mesh::app::AppEvent> {
        tokio::time::timeout(Duration::from_secs(20), c.events.recv())
            .await
            .ok()
            .flatten()
    }

    /// The data plane's link to `peer` once there is one whose connection UID is not `not_uid`.
    async fn next_link(
        view: &mut watch::Receiver<DataPlaneView>,
        peer: PeerName,
        not_uid: Option<u64>,
    ) -> PeerLink {
        let link = tokio::time::timeout(
            Duration::from_secs(20),
            view.wait_for(|v| {
                v.peers
                    .get(&peer)
                    .is_some_and(|l| Some(l.conn_uid) != not_uid)
            }),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .and_then(|v| v.peers.get(&peer).cloned());
        link.unwrap_or_else(|| panic!("no link to {peer} in {:#?}", view.borrow()))
    }

    fn overlay(peer: PeerName, conn_uid: u64, established: bool, timed_out: bool) -> OverlayStatus {
        OverlayStatus {
            peers: BTreeMap::from([(
                peer,
                OverlayPeer {
                    conn_uid,
                    established,
                    mtu: 1376,
                    timed_out,
                    ..OverlayPeer::default()
                },
            )]),
        }
    }

    fn mtu_attr(s: &StatusSnapshot) -> Option<Value> {
        s.router
            .connections
            .first()
            .and_then(|c| c.attrs.as_ref())
            .and_then(|a| a.get("mtu").cloned())
    }

    /// With a data plane attached, a connection is pending until the forwarder of that very
    /// connection is established; data routes need both ends established; a heartbeat timeout
    /// tears the connection down and the dialler retries. Both ends trust 127.0.0.0/8, so UDP
    /// goes in plaintext (TCP still encrypted with the password).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_wait_for_the_overlay() {
        let (pa, pb) = (free_port(), free_port());
        let (na, nb) = (PeerName::from_u64(1), PeerName::from_u64(2));
        let trusted = crate::addr::parse_cidr_list("127.0.0.0/8").expect("subnets");
        let (tx_a, mut rx_a) = watch::channel(snapshot(1, pa));
        let (tx_b, mut rx_b) = watch::channel(snapshot(2, pb));
        let mut config_a = mesh_config(1, pa, "pw", vec![]);
        config_a.await_overlay = true;
        config_a.trusted_subnets = trusted.clone();
        let mut config_b = mesh_config(2, pb, "pw", vec![format!("127.0.0.1:{pa}")]);
        config_b.await_overlay = true;
        config_b.trusted_subnets = trusted;
        let mut a = start(config_a, tx_a).await.expect("mesh a");
        let mut b = start(config_b, tx_b).await.expect("mesh b");

        let link_a = next_link(&mut a.view, nb, None).await;
        let uid_a = link_a.conn_uid;
        assert!(
            !link_a.udp_encrypted,
            "both ends trust each other: UDP in plaintext"
        );
        let link_b = next_link(&mut b.view, na, None).await;
        let uid_b = link_b.conn_uid;
        assert!(!link_b.udp_encrypted);
        assert_eq!(uid_a, uid_b, "one connection UID for both ends");
        let pending = |s: &StatusSnapshot| {
            s.router.connections.len() == 1
                && s.router.connections[0].state == ConnectionState::Pending
        };
        wait_for(&mut rx_a, "a pending", pending).await;
        wait_for(&mut rx_b, "b pending", pending).await;
        {
            let s = rx_a.borrow();
            let r = &s.router;
            assert!(r.peers[0].connections.iter().all(|c| !c.established));
            assert!(r.unicast_routes.is_empty(), "no data routes yet");
            assert!(r.encryption);
            assert!(r.connections[0]
                .info
                .starts_with("unencrypted sleeve 00:00:00:00:00:02(node2)"));
            let attrs = r.connections[0].attrs.clone().unwrap_or_default();
            assert_eq!(attrs.get("encrypted"), Some(&Value::Bool(false)));
            assert_eq!(r.trusted_subnets, vec!["127.0.0.0/8".to_string()]);
        }

        // A report about another connection changes nothing; one about this connection shows
        // its MTU but, not established yet, leaves it pending.
        b.handle
            .overlay_status(overlay(na, uid_b ^ 1, true, true))
            .await
            .expect("status");
        b.handle
            .overlay_status(overlay(na, uid_b, false, false))
            .await
            .expect("status");
        wait_for(&mut rx_b, "b shows the MTU", |s| {
            mtu_attr(s) == Some(json!(1376))
        })
        .await;
        assert!(pending(&rx_b.borrow()), "{:#?}", rx_b.borrow().router);

        // a's forwarder established: a's end is, and gossip tells b; data routes need both.
        a.handle
            .overlay_status(overlay(nb, uid_a, true, false))
            .await
            .expect("status");
        wait_for(&mut rx_a, "a established", |s| {
            s.router.connections.first().map(|c| c.state) == Some(ConnectionState::Established)
                && s.router.peers[0].connections.iter().all(|c| c.established)
        })
        .await;
        let name_a = na.to_string();
        wait_for(&mut rx_b, "b learns a's end is established", |s| {
            s.router
                .peers
                .iter()
                .any(|p| p.name == name_a && p.connections.iter().any(|c| c.established))
        })
        .await;
        assert!(pending(&rx_b.borrow()));
        assert!(rx_a.borrow().router.unicast_routes.is_empty());

        // b's too: routes over the now symmetric link, on both sides.
        b.handle
            .overlay_status(overlay(na, uid_b, true, false))
            .await
            .expect("status");
        let routes_to = |peer: PeerName| {
            let dest = peer.to_string();
            move |s: &StatusSnapshot| s.router.unicast_routes.iter().any(|r| r.dest == dest)
        };
        wait_for(&mut rx_a, "a routes to b", routes_to(nb)).await;
        wait_for(&mut rx_b, "b routes to a", routes_to(na)).await;
        assert_eq!(
            rx_b.borrow().router.connections[0].state,
            ConnectionState::Established
        );

        // No heartbeat for 60 s: torn down with the reason, and the dialler tries again.
        b.handle
            .overlay_status(overlay(na, uid_b, true, true))
            .await
            .expect("status");
        wait_for(&mut rx_b, "b shows the heartbeat timeout", |s| {
            s.router.connections.iter().any(|c| {
                c.state == ConnectionState::Failed && c.info.contains(UDP_HEARTBEAT_TIMEOUT)
            })
        })
        .await;
        assert_eq!(rx_b.borrow().router.termination_count, 1);
        let uid = next_link(&mut b.view, na, Some(uid_b)).await.conn_uid;
        assert_ne!(uid, uid_b, "a new connection");
        wait_for(&mut rx_b, "b pending again", pending).await;
        for m in [&a, &b] {
            m.abort();
        }
    }
}
