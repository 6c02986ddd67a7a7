//! `weave connect`, `weave forget`, and IPAM's cluster commands `weave prime` and `weave rmpeer`.

use anyhow::Result;
use weave_api::client::{ClientError, RouterClient};

use super::{router_unreachable, Exit};

/// `weave connect [--replace] <peer>...`: invalid peers are listed one per line, exit 1.
pub async fn connect(router: &RouterClient, peers: &[String], replace: bool) -> Result<()> {
    match router.connect(peers, replace).await {
        Ok(()) => Ok(()),
        Err(ClientError::Status { message, .. }) => Err(Exit::new(1, message).into()),
        Err(e) => Err(router_unreachable(e).await),
    }
}

/// `weave prime`: blocks until this peer has a ring (or the router says why not).
pub async fn prime(router: &RouterClient) -> Result<()> {
    match router.prime().await {
        Ok(()) => Ok(()),
        Err(ClientError::Status { status: 404, .. }) => Err(Exit::new(
            1,
            "IP address allocation is not enabled (weave was launched with --ipalloc-range \"\")",
        )
        .into()),
        Err(ClientError::Status { message, .. }) => Err(Exit::new(1, message.trim_end()).into()),
        Err(e) => Err(router_unreachable(e).await),
    }
}

/// `weave rmpeer <peer>...`: prints `N IPs taken over from X` per peer; exit 1 if any failed.
pub async fn rmpeer(router: &RouterClient, peers: &[String]) -> Result<()> {
    let mut failed = false;
    for peer in peers {
        match router.rmpeer(peer).await {
            Ok(text) => print!("{text}"),
            Err(ClientError::Status { message, .. }) => {
                eprintln!("{}", message.trim_end());
                failed = true;
            }
            Err(e) => return Err(router_unreachable(e).await),
        }
    }
    if failed {
        return Err(Exit::new(1, "").into());
    }
    Ok(())
}

/// `weave forget <peer>...`.
pub async fn forget(router: &RouterClient, peers: &[String]) -> Result<()> {
    match router.forget(peers).await {
        Ok(()) => Ok(()),
        Err(e) => Err(router_unreachable(e).await),
    }
}
