//! The Docker API proxy on /var/run/weave/weave.sock: Docker clients talk to it as if it were
//! dockerd; it forwards everything, weaves containers at create (weavewait entrypoint, DNS,
//! hostname) and attaches them to the weave network when they start.
//!
//! Pure modules (no IO, unit-tested): [`cidr`], [`endpoint`], [`rewrite`] (with [`hostname`]),
//! and the head codec `head`. Shells: `server` (listener, per-connection choice between hyper and
//! the raw hijack path), `intercept` (the per-endpoint handling), `body` (bodies streamed or
//! collected), `forward` (replies back) and `upstream` (the way to dockerd, with its own
//! error), `hijack` (101 upgrades and raw 200 streams), [`docker`] (side calls through
//! bollard), [`attach`] (the attach procedure, behind the [`attach::Network`] trait), `events`
//! (re-attach at start-up and on Docker events), [`error`], and `sys` (the `unsafe` system
//! calls: `SIOCOUTQ`, pidfds). Imports between them form no cycle (`tests/module_graph.rs`).
//!
//! Entry point: [`run`].

pub mod attach;
mod body;
pub mod cidr;
pub mod docker;
pub mod endpoint;
pub mod error;
mod events;
mod forward;
/// Public only for the fuzz targets in proxy/fuzz.
#[doc(hidden)]
pub mod head;
mod hijack;
mod intercept;
mod prefixed;
mod proxy;
pub mod rewrite;
mod server;
mod sys;
mod upstream;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::UnixListener;
use tracing::{info, warn};
use weave_api::client::RouterClient;

pub use crate::attach::{AttachOptions, Network};
pub use crate::body::BodyError;
pub use crate::docker::{BollardDocker, DockerApi};
pub use crate::error::ProxyError;
use crate::proxy::{Proxy, StartTracker, ATTACH_TIMEOUT};
pub use crate::rewrite::{hostname, CreateOptions};
pub use crate::upstream::{Upstream, UpstreamError};

/// The proxy's one real socket (spec §1.2).
pub const DEFAULT_SOCKET_PATH: &str = "/var/run/weave/weave.sock";
/// dockerd, unless `--docker-api`/`DOCKER_HOST` says otherwise.
pub const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";

/// Everything the proxy needs to run.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// dockerd: `unix:///var/run/docker.sock`, a unix path, or `tcp://host:port`.
    pub docker_host: String,
    /// Where to listen (`/var/run/weave/weave.sock`).
    pub socket_path: PathBuf,
    /// The router's API (its unix socket: attaching changes the network).
    pub router: RouterClient,
    /// Create/start rewrite settings.
    pub create: CreateOptions,
    /// `--rewrite-inspect`.
    pub rewrite_inspect: bool,
    /// `--no-multicast-route` (also forced by `--awsvpc`).
    pub no_multicast_route: bool,
    /// Keep TX checksum offload on for `ethwe` (`--awsvpc`).
    pub keep_tx_on: bool,
}

/// Runs the proxy until `shutdown` resolves: listens on `config.socket_path`, re-attaches the
/// running containers, follows Docker events, and serves. On shutdown it stops accepting and
/// removes the socket; connections in progress (streams, attaches) are not waited for.
///
/// dockerd need not be up: requests then get a 500 and the events watcher keeps retrying.
pub async fn run(
    config: ProxyConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ProxyError> {
    let upstream = Upstream::parse(&config.docker_host)?;
    let docker = Arc::new(BollardDocker::new(upstream.clone()));
    let network = Arc::new(config.router.clone());
    run_with(config, upstream, docker, network, shutdown).await
}

/// [`run`] with the dockerd side-call client and the router given (tests pass fakes).
pub async fn run_with(
    config: ProxyConfig,
    upstream: Upstream,
    docker: Arc<dyn DockerApi>,
    network: Arc<dyn Network>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ProxyError> {
    let listener = listen(&config.socket_path, &upstream)?;
    info!(socket = %config.socket_path.display(), docker = %upstream.url(), "proxy listening");
    let proxy = Arc::new(Proxy {
        upstream,
        docker,
        network,
        attach: AttachOptions {
            no_multicast_route: config.no_multicast_route,
            keep_tx_on: config.keep_tx_on,
            no_default_ipalloc: config.create.no_default_ipalloc,
        },
        create: config.create,
        rewrite_inspect: config.rewrite_inspect,
        starts: StartTracker::default(),
        attach_timeout: ATTACH_TIMEOUT,
    });
    let watcher = tokio::spawn(events::watch(proxy.clone()));
    server::serve(listener, proxy, shutdown).await;
    watcher.abort();
    match std::fs::remove_file(&config.socket_path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => warn!(socket = %config.socket_path.display(), error = %e, "cannot remove socket"),
    }
    info!("proxy stopped");
    Ok(())
}

/// Mode of the proxy socket when it cannot have the docker socket's.
const FALLBACK_MODE: u32 = 0o660;
/// Group that owns the proxy socket when it cannot have the docker socket's owner.
const FALLBACK_GROUP: &str = "docker";

/// Binds the socket: parent directory created, any stale file removed, and the docker socket's
/// mode and owner given to it (or 0660 root:docker), so exactly who may use dockerd may use
/// the proxy. It is bound under a temporary name and renamed into place once that is done, so
/// nobody can connect while it still has the umask's mode.
fn listen(path: &Path, upstream: &Upstream) -> Result<UnixListener, ProxyError> {
    let listen_error = |source| ProxyError::Listen {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(listen_error)?;
    }
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(path.file_name().unwrap_or_default());
    tmp_name.push(format!(".{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    for stale in [path, tmp.as_path()] {
        match std::fs::remove_file(stale) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(listen_error(e)),
        }
    }
    let listener = UnixListener::bind(&tmp).map_err(listen_error)?;
    set_access(&tmp, upstream);
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(listen_error(e));
    }
    Ok(listener)
}

/// The docker socket's owner and mode, or else 0660 root:docker (root:root without a docker
/// group); never what the umask left.
fn set_access(socket: &Path, upstream: &Upstream) {
    match upstream {
        Upstream::Unix(docker_socket) => match copy_owner_and_mode(docker_socket, socket) {
            Ok(()) => return,
            Err(e) => warn!(
                docker = %docker_socket.display(),
                error = %e,
                "cannot give the proxy socket the docker socket's owner and mode; using 0660 root:{FALLBACK_GROUP}"
            ),
        },
        Upstream::Tcp(_) => {
            info!("dockerd is on TCP: the proxy socket gets mode 0660, owner root:{FALLBACK_GROUP}")
        }
    }
    let gid = match nix::unistd::Group::from_name(FALLBACK_GROUP) {
        Ok(Some(group)) => group.gid.as_raw(),
        _ => {
            warn!("no group {FALLBACK_GROUP:?}: the proxy socket is for root only");
            0
        }
    };
    if let Err(e) = std::fs::set_permissions(socket, std::fs::Permissions::from_mode(FALLBACK_MODE))
    {
        warn!(error = %e, "cannot set the proxy socket's mode");
    }
    if let Err(e) = std::os::unix::fs::chown(socket, Some(0), Some(gid)) {
        warn!(gid, error = %e, "cannot give the proxy socket to root and the docker group");
    }
}

fn copy_owner_and_mode(from: &Path, to: &Path) -> io::Result<()> {
    let meta = std::fs::metadata(from)?;
    std::os::unix::fs::chown(to, Some(meta.uid()), Some(meta.gid()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(meta.mode() & 0o7777))
}

#[cfg(test)]
mod socket_tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    fn temp_dir(tag: &str) -> io::Result<PathBuf> {
        let dir = std::env::temp_dir().join(format!("weave-proxy-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    #[tokio::test]
    async fn takes_the_docker_sockets_owner_and_mode() -> io::Result<()> {
        let dir = temp_dir("copy")?;
        let docker = dir.join("docker.sock");
        std::fs::write(&docker, b"")?;
        // An odd mode, so it cannot come from a default or the umask.
        std::fs::set_permissions(&docker, std::fs::Permissions::from_mode(0o604))?;
        let root = nix::unistd::Uid::effective().is_root();
        if root {
            std::os::unix::fs::chown(&docker, Some(4321), Some(8765))?;
        }
        let want = std::fs::metadata(&docker)?;
        let path = dir.join("run/weave.sock");
        let _listener = listen(&path, &Upstream::Unix(docker.clone()))
            .map_err(|e| io::Error::other(e.to_string()))?;
        let got = std::fs::metadata(&path)?;
        assert!(got.file_type().is_socket());
        assert_eq!(got.mode() & 0o7777, 0o604);
        assert_eq!((got.uid(), got.gid()), (want.uid(), want.gid()));
        assert_eq!(
            std::fs::read_dir(dir.join("run"))?.count(),
            1,
            "no temporary left"
        );
        std::fs::remove_dir_all(&dir)
    }

    #[tokio::test]
    async fn falls_back_to_0660_root_docker() -> io::Result<()> {
        let dir = temp_dir("fallback")?;
        let path = dir.join("weave.sock");
        for upstream in [
            Upstream::Unix(dir.join("no-such-docker.sock")),
            Upstream::Tcp("127.0.0.1:2375".into()),
        ] {
            let _listener =
                listen(&path, &upstream).map_err(|e| io::Error::other(e.to_string()))?;
            let got = std::fs::metadata(&path)?;
            assert_eq!(got.mode() & 0o7777, 0o660, "{upstream:?}");
            if nix::unistd::Uid::effective().is_root() {
                let docker_gid = nix::unistd::Group::from_name("docker")
                    .ok()
                    .flatten()
                    .map_or(0, |g| g.gid.as_raw());
                assert_eq!((got.uid(), got.gid()), (0, docker_gid), "{upstream:?}");
            }
        }
        std::fs::remove_dir_all(&dir)
    }
}
