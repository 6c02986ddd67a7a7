//! The weave router: one per host. It owns the `weave` bridge, attaches containers to it,
//! installs the iptables rules the bridge needs, runs the mesh (TCP 6783: handshake, encryption,
//! topology gossip, connection maker), serves the HTTP API (reading routes on 127.0.0.1:6784,
//! everything on a unix socket for root and the docker group, [`access`]) that the CLI and the
//! proxy use, and the sleeve (pcap + UDP 6783 data plane, [`sleeve_shell`]).
//!
//! The mesh and the data plane talk through two small tasks in [`feed`]. Every long-lived part
//! is registered with a [`supervise::Supervisor`]: when one ends, the router reports not ready,
//! logs which part and why, and returns [`RouterError::PartEnded`] (the binary exits non-zero and
//! Docker's restart policy brings up a fresh router) rather than running on with links that are
//! black holes. Queues between the parts are bounded in count and bytes ([`queue`]).
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
pub mod dns;
pub mod feed;
pub mod fragment;
pub mod gro;
pub mod icmp;
pub mod ipam;
pub mod ipam_shell;
pub mod iptables;
pub mod mac_cache;
pub mod mesh;
pub mod mesh_shell;
pub mod queue;
pub mod sleeve;
pub mod sleeve_shell;
pub mod status;
pub mod supervise;

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
    /// IP address allocation (`None`: `--ipalloc-range ""`, off).
    pub ipam: Option<ipam_shell::IpamSettings>,
    /// Where IPAM keeps its state across restarts.
    pub ipam_state: PathBuf,
    /// weaveDNS (`None`: `--no-dns`).
    pub dns: Option<dns::DnsConfig>,
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
    #[error("cannot start the data plane thread: {0}")]
    DataPlaneThread(#[source] std::io::Error),
    /// A long-lived part ended: the router stops, to be restarted whole.
    #[error("{part} ended: {why}")]
    PartEnded { part: &'static str, why: String },
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
        // Ready once the data plane's capture is open (`feed::watch_data_plane`).
        ready: false,
        failed: None,
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
    let mut parts = supervise::Supervisor::new();
    for (name, task) in running.take_tasks() {
        parts.adopt(name, task);
    }
    // The data plane: captured frames go to peers over UDP, received ones are injected. The
    // mesh tells it which peers are up, with which keys, and the routes.
    let (dp_tx, dp_rx) = tokio::sync::mpsc::channel(feed::DATA_PLANE_QUEUE);
    let (dp_status_tx, dp_status) = watch::channel(sleeve_shell::DataPlaneStatus::default());
    let mut data_plane_config = sleeve_shell::DataPlaneConfig::new(
        mesh::peer::PeerName::from_bytes(mac.0),
        SocketAddr::from(([0, 0, 0, 0], config.port)),
    );
    data_plane_config.capture = capture::CaptureConfig::for_mtu(config.mtu);
    let interface = format!("{} (via pcap)", data_plane_config.capture_iface);
    let (stop_data_plane, data_plane_stopped) = tokio::sync::oneshot::channel::<()>();
    let data_plane =
        feed::spawn_data_plane(data_plane_config, dp_rx, dp_status_tx, data_plane_stopped)
            .map_err(RouterError::DataPlaneThread)?;
    let data_plane_done = parts.spawn("data plane", async move {
        data_plane
            .await
            .unwrap_or_else(|_| Err("its thread ended without a word".to_string()))
    });
    parts.spawn(
        "data-plane feed",
        feed::feed_data_plane(running.view.clone(), dp_tx, config.port),
    );
    parts.spawn(
        "data-plane watch",
        feed::watch_data_plane(
            dp_status,
            running.handle.clone(),
            status_tx.clone(),
            interface,
        ),
    );
    let (control, owner) = control::spawn(bridge);
    let owner_abort = owner.abort_handle();
    let control_done = parts.adopt("bridge control", owner);
    let ipam = start_ipam(
        &config,
        mesh::peer::PeerName::from_bytes(mac.0),
        uid,
        &running.handle,
        &containers,
        &control,
        &mut parts,
    )
    .await?;
    let state = api::ApiState {
        control,
        status: status_rx,
        mesh: running.handle.clone(),
        containers,
        ipam,
    };
    let listeners = api::Listeners {
        tcp: listener,
        socket,
        socket_group: config.api_socket_group,
    };
    // The API server runs here; when a part fails it is dropped at once (no grace for its
    // connections: the router is going down).
    let failure = tokio::select! {
        () = api::serve(listeners, state, shutdown) => None,
        failure = parts.failed() => Some(failure),
    };
    if let Some(f) = &failure {
        status_tx.send_modify(|s| {
            s.ready = false;
            s.failed = Some(f.to_string());
        });
        tracing::error!(part = f.part, why = %f.why, "a part of the router ended: stopping, to be restarted");
    }
    let _ = std::fs::remove_file(&config.api_socket);
    // The data plane and the bridge owner stop on their own, below; everything else now.
    parts.abort_except(&["data plane", "bridge control"]);
    let _ = stop_data_plane.send(());
    let _ = tokio::time::timeout(CONTROL_GRACE, data_plane_done).await;
    // Every handle is gone with the server, so the owner stops after the command in flight.
    if tokio::time::timeout(CONTROL_GRACE, control_done)
        .await
        .is_err()
    {
        owner_abort.abort();
    }
    match failure {
        Some(f) => Err(RouterError::PartEnded {
            part: f.part,
            why: f.why,
        }),
        None => {
            tracing::info!("weave router stopped");
            Ok(())
        }
    }
}

/// IPAM's actor, its gossip carrier and Docker's events, supervised like every other part;
/// then, in the background, the start-up prune and pre-claims. `None` when IPAM is off.
async fn start_ipam(
    config: &RouterConfig,
    me: mesh::peer::PeerName,
    uid: u64,
    mesh: &mesh_shell::MeshHandle,
    containers: &Arc<dyn containers::ContainerDirectory>,
    control: &control::ControlHandle,
    parts: &mut supervise::Supervisor,
) -> Result<Option<ipam_shell::IpamHandle>, RouterError> {
    let Some(settings) = config.ipam.clone() else {
        return Ok(None);
    };
    let Some(factory) = ipam_shell::builtin_core() else {
        tracing::warn!("this router is built without the IP allocator: IPAM is off");
        return Ok(None);
    };
    let wire = ipam_shell::mesh_wire(mesh)
        .await
        .map_err(|e| RouterError::PartEnded {
            part: "mesh",
            why: format!("cannot open the IPAM channel: {e}"),
        })?;
    let state = ipam_shell::StateFile::new(&config.ipam_state);
    let persisted = match state.load() {
        Ok(bytes) => bytes,
        Err(e) => {
            tracing::warn!(path = %config.ipam_state.display(), error = %e, "cannot read IPAM state: starting afresh");
            None
        }
    };
    let core = factory(ipam_shell::CoreInit {
        settings: settings.clone(),
        me,
        nickname: config.nickname.clone(),
        uid,
        persisted,
        now: tokio::time::Instant::now().into_std(),
    });
    tracing::info!(range = %settings.range, default_subnet = %settings.default_subnet, init = ?settings.init, "IP address allocation on");
    let ipam = ipam_shell::start(core, settings, wire, state);
    parts.spawn("ipam", ipam.actor);
    parts.spawn("ipam gossip", ipam.outgoing);
    parts.spawn(
        "docker events",
        ipam_shell::pump_container_events(ipam.handle.clone(), containers.clone()),
    );
    let (handle, containers, control) = (ipam.handle.clone(), containers.clone(), control.clone());
    tokio::spawn(async move {
        ipam_shell::startup_claims(&handle, &*containers, &control).await;
    });
    Ok(Some(ipam.handle))
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
