//! The Docker API proxy on /var/run/weave/weave.sock: Docker clients talk to it as if it were
//! dockerd; it forwards everything, weaves containers at create (weavewait entrypoint, DNS,
//! hostname) and attaches them to the weave network when they start.
//!
//! Pure modules (no IO, unit-tested): [`cidr`], [`endpoint`], [`hostname`], [`rewrite`], and
//! the head codec `head`. Shells: `server` (listener, per-connection choice between hyper and
//! the raw hijack path), `intercept` (the per-endpoint handling), `forward` and `upstream`
//! (streaming to and from dockerd), `hijack` (101 upgrades and raw 200 streams), [`docker`]
//! (side calls through bollard), [`attach`] (the attach procedure, behind the [`attach::Network`]
//! trait), `events` (re-attach at start-up and on Docker events), [`error`].
//!
//! Entry point: [`run`].

pub mod attach;
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
pub mod hostname;
mod intercept;
mod prefixed;
mod proxy;
pub mod rewrite;
mod server;
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
pub use crate::docker::{BollardDocker, DockerApi};
pub use crate::error::ProxyError;
use crate::proxy::{Proxy, StartTracker, ATTACH_TIMEOUT};
pub use crate::rewrite::CreateOptions;
pub use crate::upstream::Upstream;

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

/// Binds the socket: parent directory created, any stale file removed, and (with a unix
/// upstream) the docker socket's mode and owner copied, so members of the `docker` group can
/// use the proxy too.
fn listen(path: &Path, upstream: &Upstream) -> Result<UnixListener, ProxyError> {
    let listen_error = |source| ProxyError::Listen {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(listen_error)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(listen_error(e)),
    }
    let listener = UnixListener::bind(path).map_err(listen_error)?;
    if let Upstream::Unix(docker_socket) = upstream {
        if let Err(e) = copy_owner_and_mode(docker_socket, path) {
            warn!(
                docker = %docker_socket.display(),
                error = %e,
                "cannot give the proxy socket the docker socket's owner and mode"
            );
        }
    }
    Ok(listener)
}

fn copy_owner_and_mode(from: &Path, to: &Path) -> io::Result<()> {
    let meta = std::fs::metadata(from)?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    std::os::unix::fs::chown(to, Some(meta.uid()), Some(meta.gid()))
}
