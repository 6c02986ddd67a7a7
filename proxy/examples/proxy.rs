//! Runs the proxy by hand, for manual checks against a real dockerd:
//!
//! ```text
//! cargo run -p weave-proxy --example proxy -- unix:///run/docker.sock /tmp/weave.sock [weavewait-dir]
//! docker -H unix:///tmp/weave.sock run --rm -e WEAVE_CIDR=none busybox echo hi
//! ```
//!
//! The router is expected at 127.0.0.1:6784 (`WEAVE_HTTP_ADDR` overrides); without one, starts
//! of woven containers fail and kill the container, which is the specified behaviour. Logs go to
//! stderr (`RUST_LOG`, default `weave_proxy=debug`).

use std::net::Ipv4Addr;
use std::path::PathBuf;

use weave_proxy::hostname::HostnameRule;
use weave_proxy::{run, CreateOptions, ProxyConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "weave_proxy=debug".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let docker_host = args
        .next()
        .unwrap_or_else(|| weave_proxy::DEFAULT_DOCKER_HOST.to_string());
    let socket_path = PathBuf::from(
        args.next()
            .unwrap_or_else(|| weave_proxy::DEFAULT_SOCKET_PATH.to_string()),
    );
    let weavewait_dir = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "/var/lib/weave/weavewait".to_string()),
    );
    let router = weave_api::client::RouterClient::new(
        std::env::var("WEAVE_HTTP_ADDR")
            .unwrap_or_else(|_| weave_api::client::DEFAULT_HTTP_ADDR.to_string())
            .parse()?,
        std::env::var("WEAVE_API_SOCKET")
            .unwrap_or_else(|_| weave_api::client::DEFAULT_API_SOCKET.to_string()),
    );
    let config = ProxyConfig {
        docker_host,
        socket_path,
        router,
        create: CreateOptions {
            weavewait_dir,
            no_multicast_route: false,
            without_dns: false,
            dns_domain: "weave.local.".to_string(),
            dns_server: Some(Ipv4Addr::new(172, 17, 0, 1)),
            hostname: HostnameRule::new("(.*)", "$1", None)?,
            no_default_ipalloc: false,
        },
        rewrite_inspect: true,
        no_multicast_route: false,
        keep_tx_on: false,
    };
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    run(config, shutdown).await?;
    Ok(())
}
