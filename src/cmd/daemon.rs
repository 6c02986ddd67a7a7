//! The daemons the `weave` and `weaveproxy` containers run, in the foreground, until SIGTERM.

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};
use weave_api::client::RouterClient;

use crate::cli::{ProxyArgs, RouterArgs};

/// Resolves on SIGTERM (docker stop) or SIGINT (Ctrl-C in `docker attach`).
async fn shutdown_signal() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

/// The group that may use the router's API socket besides root: the group of dockerd's socket
/// (`docker`), since its members can run containers as root anyway. 0 (root only) when dockerd
/// is not reached over a unix socket.
fn api_socket_group(docker_api: &str) -> u32 {
    let Some(path) = crate::docker::docker_socket_path(docker_api) else {
        return 0;
    };
    match std::fs::metadata(path) {
        Ok(meta) => meta.gid(),
        Err(e) => {
            tracing::warn!(path, error = %e, "cannot read dockerd's socket: the API socket is for root only");
            0
        }
    }
}

pub async fn router(args: RouterArgs, client: RouterClient) -> Result<()> {
    let containers = weave_router::containers::Dockerd::connect(&args.docker_api)
        .context("the router asks dockerd which containers exist")?;
    let mut ipam = weave_router::ipam_shell::settings(
        args.ipam.ipalloc_range.as_deref().unwrap_or(""),
        args.ipam.ipalloc_default_subnet.as_deref(),
        args.ipam.ipalloc_init.as_deref(),
        args.peers.len(),
    )?;
    if let (Some(ipam), Some(timeout)) = (
        ipam.as_mut(),
        weave_router::ipam_shell::request_timeout_from(
            std::env::var(weave_router::ipam_shell::REQUEST_TIMEOUT_ENV)
                .ok()
                .as_deref(),
        ),
    ) {
        ipam.request_timeout = timeout;
    }
    let config = weave_router::RouterConfig {
        http_addr: client.addr(),
        api_socket: client.socket().to_path_buf(),
        api_socket_group: api_socket_group(&args.docker_api),
        bridge_name: args.bridge,
        mtu: args.mtu,
        nickname: args.nickname.unwrap_or_else(super::launch::hostname),
        proxy_addrs: args.proxy_addrs,
        version: env!("CARGO_PKG_VERSION").to_string(),
        port: args.port,
        // `weave launch` passes the password in the environment, never on the command line.
        password: std::env::var("WEAVE_PASSWORD")
            .ok()
            .filter(|p| !p.is_empty()),
        peers: args.peers,
        discovery: !args.no_discovery,
        conn_limit: args.conn_limit,
        trusted_subnets: args.trusted_subnets.unwrap_or_default().0,
        ipam,
        ipam_state: args.ipam_state,
        dns: None,
    };
    weave_router::run(config, Arc::new(containers), shutdown_signal())
        .await
        .context("router failed")
}

pub async fn proxy(args: ProxyArgs, router: RouterClient) -> Result<()> {
    crate::weavewait::install(&args.weavewait_dir).with_context(|| {
        format!(
            "installing the weavewait entrypoint in {}",
            args.weavewait_dir.display()
        )
    })?;
    let opts = args.opts;
    let hostname = weave_proxy::hostname::HostnameRule::new(
        &opts.hostname_match,
        &opts.hostname_replacement,
        opts.hostname_from_label.as_deref(),
    )
    .context("invalid --hostname-match")?;
    let config = weave_proxy::ProxyConfig {
        docker_host: args.docker_api,
        socket_path: args.socket,
        router,
        create: weave_proxy::rewrite::CreateOptions {
            weavewait_dir: args.weavewait_dir,
            no_multicast_route: opts.no_multicast_route,
            without_dns: opts.without_dns,
            dns_domain: args.dns_domain,
            // weaveDNS is not there yet: leave the containers' resolvers alone.
            dns_server: None,
            hostname,
            no_default_ipalloc: opts.no_default_ipalloc,
        },
        rewrite_inspect: opts.rewrite_inspect,
        no_multicast_route: opts.no_multicast_route,
        keep_tx_on: opts.keep_tx_on,
    };
    weave_proxy::run(config, shutdown_signal())
        .await
        .context("proxy failed")
}
