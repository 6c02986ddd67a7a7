//! The weave router: one per host. It owns the `weave` bridge, attaches containers to it,
//! installs the iptables rules the bridge needs, runs the mesh (TCP 6783: handshake, encryption,
//! topology gossip, connection maker), serves the HTTP API (reading routes on 127.0.0.1:6784,
//! everything on a unix socket for root and the docker group, [`access`]) that the CLI and the
//! proxy use, and the sleeve (pcap + UDP 6783 data plane, [`sleeve_shell`]).
//!
//! The mesh and the data plane talk through two small tasks here: `feed_data_plane` turns
//! [`mesh_shell::MeshEvent`]s into data-plane commands (peer up/down, keys, routes), and
//! `watch_data_plane` turns the data plane's status into [`mesh_shell::OverlayStatus`] reports
//! (forwarder established / timed out, MTU) for the mesh, which gates each connection's
//! `established` state on them, and into the report's `Interface` and `CaptureStats`.
//!
//! Pure modules (no IO, unit-tested without root): [`status`], and the API's [`addr`] and
//! [`api_types`] (from the `weave-api` crate, which also holds the client the CLI and the proxy
//! use). Shells: [`bridge`] (the only place that talks rtnetlink), [`iptables`], [`api`] (HTTP
//! server) with [`access`] (who may change things) and [`containers`] (which PIDs are
//! containers), `control` (the task that owns the bridge), [`mesh_shell`] (the mesh's TCP
//! connections, one task each, around the pure [`mesh`] core).

pub mod access;
pub mod api;
pub mod bridge;
pub mod capture;
pub mod checksum;
pub mod containers;
mod control;
pub mod fragment;
pub mod gro;
pub mod icmp;
pub mod iptables;
pub mod mac_cache;
pub mod mesh;
pub mod mesh_shell;
pub mod sleeve;
pub mod sleeve_shell;
pub mod status;

use std::collections::hash_map::RandomState;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

pub use bridge::{Bridge, BridgeError, MacAddr};
pub use iptables::IptablesError;
/// The API's address grammar and bodies live in their own crate, shared with the clients.
pub use weave_api::{addr, types as api_types};

/// Weave's mesh port.
pub const MESH_PORT: u16 = 6783;
/// Default cap on mesh connections (`--conn-limit`).
pub const DEFAULT_CONN_LIMIT: usize = 200;
/// Default bridge name.
pub const DEFAULT_BRIDGE: &str = "weave";
/// Default bridge MTU (Weave's fastdp default; fits GCE's 1460 with encapsulation).
pub const DEFAULT_MTU: u32 = 1376;

/// How long the bridge owner gets to finish a command in flight at shutdown.
const CONTROL_GRACE: Duration = Duration::from_secs(10);

/// Everything `run` needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterConfig {
    /// HTTP API address for the reading routes, normally 127.0.0.1:6784.
    pub http_addr: SocketAddr,
    /// The unix socket for every route (normally /var/run/weave/router.sock).
    pub api_socket: PathBuf,
    /// Besides root, members of this group may use the socket (dockerd's socket's group); 0
    /// means root only.
    pub api_socket_group: u32,
    /// Bridge name, normally `weave`.
    pub bridge_name: String,
    /// Bridge MTU (and of every container interface); default 1376.
    pub mtu: u32,
    /// Shown next to the peer name, normally the host name.
    pub nickname: String,
    /// Where the Docker API proxy listens (shown by `weave status`, served by `/proxyaddrs`);
    /// empty when there is no proxy.
    pub proxy_addrs: Vec<String>,
    /// Release string shown by `weave status` / `weave version`.
    pub version: String,
    /// Mesh port, normally 6783.
    pub port: u16,
    /// Mesh password (`WEAVE_PASSWORD`); `None` = unencrypted.
    pub password: Option<String>,
    /// Peers to connect to (`host[:port]`).
    pub peers: Vec<String>,
    /// Connect to peers learnt through gossip.
    pub discovery: bool,
    /// Cap on mesh connections (0 = unlimited).
    pub conn_limit: usize,
    /// `--trusted-subnets`: UDP in plaintext with peers in these that trust us too.
    pub trusted_subnets: Vec<addr::Ipv4Cidr>,
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error(transparent)]
    Bridge(#[from] BridgeError),
    #[error(transparent)]
    Iptables(#[from] IptablesError),
    #[error("cannot listen on port {port} for the mesh: {source}")]
    MeshListen {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Socket(#[from] access::SocketError),
    #[error("cannot listen on {addr} for the HTTP API: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A random non-zero u64 (peer UID: detects restarts).
fn random_u64() -> u64 {
    loop {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
        );
        hasher.write_u32(std::process::id());
        let value = hasher.finish();
        if value != 0 {
            return value;
        }
    }
}

/// Run the router: ensure the bridge and its iptables rules, re-apply the rules of addresses
/// already exposed on the bridge, then serve the HTTP API until `shutdown` resolves. Attach and
/// detach act only on containers `containers` (dockerd) knows. The bridge and attached
/// containers stay in place afterwards, so local traffic keeps flowing.
pub async fn run(
    config: RouterConfig,
    containers: Arc<dyn containers::ContainerDirectory>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RouterError> {
    let mut bridge = Bridge::new(&config.bridge_name)?;
    let mac = bridge.ensure(config.mtu).await?;
    bridge.ensure_capture_port().await?;
    iptables::ensure_forward_rules(&config.bridge_name).await?;
    iptables::ensure_input_rules(&iptables::HostPorts {
        api: config.http_addr,
        mesh: config.port,
        docker_bridge_ip: bridge.link_ipv4(iptables::DOCKER_BRIDGE).await?,
    })
    .await?;
    iptables::flush_expose_rules().await?;
    for cidr in bridge.bridge_addrs().await? {
        iptables::expose_rules(&config.bridge_name, cidr, false).await?;
        tracing::info!(%cidr, "re-exposed bridge address");
    }
    let listener = TcpListener::bind(config.http_addr)
        .await
        .map_err(|source| RouterError::Listen {
            addr: config.http_addr,
            source,
        })?;
    let socket = access::bind_socket(&config.api_socket, config.api_socket_group)?;
    tracing::info!(
        bridge = %config.bridge_name,
        mtu = config.mtu,
        name = %mac,
        nickname = %config.nickname,
        api = %config.http_addr,
        socket = %config.api_socket.display(),
        "weave router started"
    );

    let uid = random_u64();
    let snapshot = status::StatusSnapshot {
        ready: true,
        version: config.version.clone(),
        router: status::RouterStatus {
            peer_discovery: config.discovery,
            trusted_subnets: config
                .trusted_subnets
                .iter()
                .map(ToString::to_string)
                .collect(),
            ..status::RouterStatus::alone(
                &mac.to_string(),
                &config.nickname,
                config.port,
                uid,
                (uid >> 52) as u16,
            )
        },
        proxy: (!config.proxy_addrs.is_empty()).then(|| status::ProxyStatus {
            addresses: config.proxy_addrs.clone(),
        }),
    };
    // The mesh task publishes its part of the status through the sender, `watch_data_plane`
    // the data plane's part.
    let (status_tx, status_rx) = watch::channel(snapshot);
    let mesh_config = mesh_shell::MeshConfig {
        name: mesh::peer::PeerName::from_bytes(mac.0),
        nickname: config.nickname.clone(),
        uid,
        port: config.port,
        password: config.password.clone().filter(|p| !p.is_empty()),
        peers: config.peers.clone(),
        discovery: config.discovery,
        conn_limit: config.conn_limit,
        kdf: mesh::handshake::KdfParams::DEFAULT,
        trusted_subnets: config.trusted_subnets.clone(),
        await_overlay: true,
    };
    let mut running = mesh_shell::start(mesh_config, status_tx.clone())
        .await
        .map_err(|source| RouterError::MeshListen {
            port: config.port,
            source,
        })?;
    // The data plane: captured frames go to peers over UDP, received ones are injected. The
    // mesh tells it which peers are up, with which keys, and the routes.
    let (dp_tx, dp_rx) = tokio::sync::mpsc::channel(256);
    let (dp_status_tx, dp_status) = watch::channel(sleeve_shell::DataPlaneStatus::default());
    let mut data_plane_config = sleeve_shell::DataPlaneConfig::new(
        mesh::peer::PeerName::from_bytes(mac.0),
        SocketAddr::from(([0, 0, 0, 0], config.port)),
    );
    data_plane_config.capture = capture::CaptureConfig::for_mtu(config.mtu);
    let interface = format!("{} (via pcap)", data_plane_config.capture_iface);
    let (stop_data_plane, data_plane_stopped) = tokio::sync::oneshot::channel::<()>();
    let data_plane = spawn_data_plane(data_plane_config, dp_rx, dp_status_tx, data_plane_stopped);
    let events = std::mem::replace(
        &mut running.events,
        tokio::sync::mpsc::unbounded_channel().1,
    );
    let translate = tokio::spawn(feed_data_plane(events, dp_tx, config.port));
    let watch_status = tokio::spawn(watch_data_plane(
        dp_status,
        running.handle.clone(),
        status_tx,
        interface,
    ));
    let (control, owner) = control::spawn(bridge);
    let state = api::ApiState {
        control,
        status: status_rx,
        mesh: running.handle.clone(),
        containers,
    };
    let listeners = api::Listeners {
        tcp: listener,
        socket,
        socket_group: config.api_socket_group,
    };
    api::serve(listeners, state, shutdown).await;
    let _ = std::fs::remove_file(&config.api_socket);
    running.abort();
    translate.abort();
    watch_status.abort();
    let _ = stop_data_plane.send(());
    if let Some(done) = data_plane {
        let _ = tokio::time::timeout(CONTROL_GRACE, done).await;
    }
    // Every handle is gone with the server, so the owner stops after the command in flight.
    let abort = owner.abort_handle();
    if tokio::time::timeout(CONTROL_GRACE, owner).await.is_err() {
        abort.abort();
    }
    tracing::info!("weave router stopped");
    Ok(())
}

/// Run the data plane on a thread of its own with a single-threaded runtime: every frame passes
/// through that one task, so it gets one thread for the capture thread to wake, no hops between
/// work-stealing workers, and no control-plane task (gossip, API) ahead of it in a queue.
/// The thread inherits the calling thread's network namespace. Returns a receiver that
/// resolves when the data plane has stopped, `None` if the thread could not start.
fn spawn_data_plane(
    config: sleeve_shell::DataPlaneConfig,
    commands: tokio::sync::mpsc::Receiver<sleeve_shell::DataPlaneCommand>,
    status: watch::Sender<sleeve_shell::DataPlaneStatus>,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> Option<tokio::sync::oneshot::Receiver<()>> {
    let (done_tx, done) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("weave-sleeve".to_string())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the data plane's runtime");
                    return;
                }
            };
            let stopped = async {
                let _ = stop.await;
            };
            let result =
                runtime.block_on(sleeve_shell::run_data_plane(config, commands, status, stopped));
            if let Err(e) = result {
                tracing::error!(error = %e, "data plane stopped: containers cannot reach other hosts");
            }
            let _ = done_tx.send(());
        });
    match spawned {
        Ok(_) => Some(done),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the data plane thread: containers cannot reach other hosts");
            None
        }
    }
}

/// Turns what the mesh reports into data-plane commands. The dialling side knows the peer's
/// UDP address (its TCP address, mesh port); the listening side learns it from heartbeats.
async fn feed_data_plane(
    mut events: tokio::sync::mpsc::UnboundedReceiver<mesh_shell::MeshEvent>,
    data_plane: tokio::sync::mpsc::Sender<sleeve_shell::DataPlaneCommand>,
    port: u16,
) {
    use mesh_shell::MeshEvent;
    use sleeve_shell::DataPlaneCommand;
    let udp_keys = |k: mesh::conn::UdpKeys| sleeve::SessionKeys {
        epoch: k.epoch,
        send: k.send,
        recv: k.recv,
    };
    while let Some(event) = events.recv().await {
        let command = match event {
            MeshEvent::ConnectionUp {
                remote,
                addr,
                outbound,
                conn_uid,
                udp_encrypted,
                keys,
                ..
            } => DataPlaneCommand::PeerUp {
                name: remote,
                conn_uid,
                // Plaintext: the address is all that identifies the peer, so both sides need it.
                remote: (outbound || !udp_encrypted || keys.is_none())
                    .then(|| SocketAddr::new(addr.ip(), port)),
                udp_keys: keys.filter(|_| udp_encrypted).map(udp_keys),
            },
            MeshEvent::UdpRekey { remote, keys } => DataPlaneCommand::Rekey {
                name: remote,
                keys: udp_keys(keys),
            },
            MeshEvent::ConnectionDown { remote } => DataPlaneCommand::PeerDown { name: remote },
            MeshEvent::Routes(routes) => DataPlaneCommand::Routes(routes),
            MeshEvent::OverlayControl { from, index, .. } => {
                tracing::debug!(%from, index, "overlay control message ignored");
                continue;
            }
        };
        if data_plane.send(command).await.is_err() {
            return;
        }
    }
}

/// What the mesh needs from the data plane's status: per peer, its forwarder's connection UID,
/// state and MTU.
fn overlay_status(dp: &sleeve_shell::DataPlaneStatus) -> mesh_shell::OverlayStatus {
    mesh_shell::OverlayStatus {
        peers: dp
            .peers
            .iter()
            .map(|(name, p)| {
                (
                    *name,
                    mesh_shell::OverlayPeer {
                        conn_uid: p.conn_uid,
                        established: p.established,
                        mtu: p.mtu,
                        timed_out: p.timed_out,
                        udp_epoch: p.udp_epoch,
                        udp_key_switches: p.udp_key_switches,
                        udp_key_drops: p.udp_key_drops,
                    },
                )
            })
            .collect(),
    }
}

/// Follows the data plane's status (published on changes and about once a second): forwarder
/// states go to the mesh (when they changed), the capture interface and libpcap's counters to
/// the report. The data plane sends its first status once its capture is open; when it stops,
/// the report goes back to no interface.
async fn watch_data_plane(
    mut dp: watch::Receiver<sleeve_shell::DataPlaneStatus>,
    mesh: mesh_shell::MeshHandle,
    status: watch::Sender<status::StatusSnapshot>,
    interface: String,
) {
    let mut sent: Option<mesh_shell::OverlayStatus> = None;
    while dp.changed().await.is_ok() {
        let (overlay, capture, sleeve) = {
            let now = dp.borrow_and_update();
            let sleeve = status::SleeveCounters {
                macs_evicted: now.drops.macs_evicted,
                icmp_rate_limited: now.drops.icmp_rate_limited,
            };
            (overlay_status(&now), now.capture, Some(sleeve))
        };
        status.send_if_modified(|s| {
            let r = &mut s.router;
            let changed =
                r.interface != interface || r.capture_stats != Some(capture) || r.sleeve != sleeve;
            r.interface.clone_from(&interface);
            r.capture_stats = Some(capture);
            r.sleeve = sleeve;
            changed
        });
        if sent.as_ref() != Some(&overlay) {
            if mesh.overlay_status(overlay.clone()).await.is_err() {
                return;
            }
            sent = Some(overlay);
        }
    }
    status.send_if_modified(|s| {
        let r = &mut s.router;
        let changed = !r.interface.is_empty() || r.capture_stats.is_some();
        r.interface.clear();
        r.capture_stats = None;
        r.sleeve = None;
        changed
    });
}

/// Create (or reuse) the bridge `name` with `mtu` in the calling thread's network namespace and
/// return its MAC. For `weave launch`, which may set up the bridge before the router runs.
pub async fn create_bridge(name: &str, mtu: u32) -> Result<MacAddr, RouterError> {
    let mut bridge = Bridge::new(name)?;
    Ok(bridge.ensure(mtu).await?)
}

/// The MAC of the existing bridge `name` (the peer name a restarted router keeps), if any.
pub async fn bridge_mac(name: &str) -> Result<Option<MacAddr>, RouterError> {
    Ok(Bridge::new(name)?.mac().await?)
}

/// `weave reset`: delete the bridge, every weave veth and every weave iptables rule and chain.
/// Idempotent. A host without the iptables command has no rules to remove.
pub async fn reset(name: &str) -> Result<(), RouterError> {
    Bridge::new(name)?.destroy().await?;
    match iptables::remove_all(name).await {
        Ok(()) => Ok(()),
        Err(IptablesError::NotFound) => {
            tracing::warn!("iptables not found: no weave rules to remove");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}
