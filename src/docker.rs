//! Reaching dockerd from the CLI. The CLI always talks to dockerd itself, never through the
//! proxy: `weave stop` must work after `eval $(weave env)`, when DOCKER_HOST names the proxy.

use anyhow::{Context, Result};
use bollard::models::ContainerInspectResponse;
use bollard::query_parameters::InspectContainerOptions;
use bollard::Docker;

use crate::cli::DEFAULT_PROXY_SOCKET;

pub const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";

/// The proxy's address as `weave env` prints it.
pub fn proxy_url() -> String {
    format!("unix://{DEFAULT_PROXY_SOCKET}")
}

/// Where dockerd is: `DOCKER_HOST`, unless that is the proxy, in which case `ORIG_DOCKER_HOST`
/// (set by `eval $(weave env)`), falling back to the default socket.
pub fn docker_host() -> String {
    let non_empty = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    match non_empty("DOCKER_HOST") {
        Some(host) if host != proxy_url() && host != DEFAULT_PROXY_SOCKET => host,
        Some(_) => non_empty("ORIG_DOCKER_HOST").unwrap_or_else(|| DEFAULT_DOCKER_HOST.into()),
        None => DEFAULT_DOCKER_HOST.into(),
    }
}

/// The unix socket path of dockerd, when it is reached over a unix socket.
pub fn docker_socket_path(host: &str) -> Option<&str> {
    host.strip_prefix("unix://")
        .or_else(|| host.starts_with('/').then_some(host))
}

pub async fn connect() -> Result<Docker> {
    let host = docker_host();
    let docker =
        Docker::connect_with_host(&host).with_context(|| format!("cannot use Docker at {host}"))?;
    docker
        .negotiate_version()
        .await
        .with_context(|| format!("cannot reach Docker at {host}: is dockerd running?"))
}

/// Inspect a container; `None` when it does not exist.
pub async fn inspect(docker: &Docker, name: &str) -> Result<Option<ContainerInspectResponse>> {
    match docker
        .inspect_container(name, None::<InspectContainerOptions>)
        .await
    {
        Ok(c) => Ok(Some(c)),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("inspecting container {name}")),
    }
}

pub fn is_running(c: &ContainerInspectResponse) -> bool {
    c.state.as_ref().and_then(|s| s.running).unwrap_or(false)
}

/// A running container's full id and init pid.
pub async fn running_container(docker: &Docker, name: &str) -> Result<(String, i32)> {
    let c = inspect(docker, name)
        .await?
        .with_context(|| format!("Error: No such container: {name}"))?;
    let pid = c.state.as_ref().and_then(|s| s.pid).unwrap_or(0);
    if !is_running(&c) || pid <= 0 {
        anyhow::bail!("container {name} is not running");
    }
    let id =
        c.id.with_context(|| format!("container {name} has no id"))?;
    Ok((id, pid as i32))
}
