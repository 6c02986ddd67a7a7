//! Run the router alone, for poking at it with curl (root; ideally inside `unshare --net`):
//! `cargo run -p weave-router --example router -- [HTTP_ADDR] [BRIDGE] [MTU]`. Stops on Ctrl-C.
//! Changes go through /var/run/weave/router.sock (root only); attach asks the local dockerd.

use std::process::ExitCode;
use std::sync::Arc;

use weave_router::{run, RouterConfig, DEFAULT_BRIDGE, DEFAULT_MTU};

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let http_addr = args.next().unwrap_or_else(|| "127.0.0.1:6784".into());
    let bridge_name = args.next().unwrap_or_else(|| DEFAULT_BRIDGE.into());
    let mtu = args.next().map(|m| m.parse()).unwrap_or(Ok(DEFAULT_MTU));
    let (Ok(http_addr), Ok(mtu)) = (http_addr.parse(), mtu) else {
        eprintln!("usage: router [HTTP_ADDR] [BRIDGE] [MTU]");
        return ExitCode::FAILURE;
    };
    let containers = match weave_router::containers::Dockerd::connect("unix:///var/run/docker.sock")
    {
        Ok(d) => Arc::new(d),
        Err(e) => {
            eprintln!("weave router: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = RouterConfig {
        http_addr,
        api_socket: weave_api::client::DEFAULT_API_SOCKET.into(),
        api_socket_group: 0,
        bridge_name,
        mtu,
        nickname: "example".into(),
        proxy_addrs: Vec::new(),
        version: env!("CARGO_PKG_VERSION").into(),
        port: weave_router::MESH_PORT,
        password: None,
        peers: Vec::new(),
        discovery: true,
        conn_limit: weave_router::DEFAULT_CONN_LIMIT,
        trusted_subnets: Vec::new(),
        ipam: None,
        ipam_state: std::env::temp_dir().join("weave-ipam-unused.json"),
        dns: None,
    };
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match run(config, containers, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weave router: {e}");
            ExitCode::FAILURE
        }
    }
}
