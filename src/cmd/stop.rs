//! `weave stop` and `weave reset`.

use anyhow::{Context, Result};
use bollard::query_parameters::{RemoveContainerOptions, StopContainerOptions};
use bollard::Docker;

use weave_api::client::{ClientError, RouterClient};
use weave_router::ipam_shell::{StateFile, STATE_FILE};

use super::launch::{BRIDGE, PROXY_CONTAINER, ROUTER_CONTAINER};
use super::Exit;
use crate::cli::DEFAULT_PROXY_SOCKET;
use crate::docker;

/// Time for the leave's gossip to reach the other peers before the router goes (Weave: 0.5 s).
const LEAVE_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

pub async fn stop() -> Result<()> {
    warn_if_env_uses_proxy();
    let docker = docker::connect().await?;
    let mut any = false;
    // Proxy first: it is the one that needs the router.
    for name in [PROXY_CONTAINER, ROUTER_CONTAINER] {
        any |= stop_container(&docker, name).await?;
    }
    if !any {
        println!("Weave is not running.");
    }
    Ok(())
}

pub async fn reset(client: &RouterClient, force: bool) -> Result<()> {
    let docker = docker::connect().await?;
    if let Some(router) = docker::inspect(&docker, ROUTER_CONTAINER).await? {
        if docker::is_running(&router) {
            // Hand our address ranges to another peer before going, so they are not lost.
            match client.leave().await {
                Ok(()) => tokio::time::sleep(LEAVE_GRACE).await,
                Err(ClientError::Status { status: 404, .. }) => {}
                Err(e) => {
                    eprintln!("WARNING: could not hand this peer's IP ranges to another peer: {e}")
                }
            }
        } else if !force && has_peers(&router) {
            // A stopped router cannot leave the cluster: its ranges would be lost.
            return Err(Exit::new(
                1,
                "ERROR: weave is not running; unable to remove from cluster.\n\
                 Re-launch weave before reset or use --force to override.",
            )
            .into());
        }
    }
    warn_if_env_uses_proxy();
    for name in [PROXY_CONTAINER, ROUTER_CONTAINER] {
        stop_container(&docker, name).await?;
        match docker
            .remove_container(
                name,
                Some(RemoveContainerOptions {
                    force: true,
                    v: true,
                    ..Default::default()
                }),
            )
            .await
        {
            Ok(()) => {}
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => {}
            Err(e) => return Err(e).with_context(|| format!("removing container {name}")),
        }
    }
    weave_router::reset(BRIDGE)
        .await
        .context("removing the weave bridge and its iptables rules")?;
    remove_if_present(std::path::Path::new(DEFAULT_PROXY_SOCKET))?;
    remove_if_present(std::path::Path::new("/var/lib/weave/weavewait"))?;
    StateFile::new(STATE_FILE)
        .remove()
        .with_context(|| format!("removing {STATE_FILE}"))?;
    Ok(())
}

/// Stops a container if it runs; true if it did.
async fn stop_container(docker: &Docker, name: &str) -> Result<bool> {
    match docker::inspect(docker, name).await? {
        Some(c) if docker::is_running(&c) => {
            docker
                .stop_container(
                    name,
                    Some(StopContainerOptions {
                        t: Some(10),
                        ..Default::default()
                    }),
                )
                .await
                .with_context(|| format!("stopping container {name}"))?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

fn has_peers(router: &bollard::models::ContainerInspectResponse) -> bool {
    router
        .args
        .as_ref()
        .is_some_and(|args| args.iter().skip(1).any(|a| !a.starts_with('-')))
}

fn warn_if_env_uses_proxy() {
    if std::env::var("DOCKER_HOST").is_ok_and(|h| h == docker::proxy_url()) {
        println!(
            "WARNING: It appears that your environment is configured to use the Weave Docker API proxy. \
             Stopping it will break this and subsequent docker invocations. \
             To restore your environment, run 'eval $(weave env --restore)'."
        );
    }
}

fn remove_if_present(path: &std::path::Path) -> Result<()> {
    let result = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match result {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}
