//! `weave connect` and `weave forget`.

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

/// `weave forget <peer>...`.
pub async fn forget(router: &RouterClient, peers: &[String]) -> Result<()> {
    match router.forget(peers).await {
        Ok(()) => Ok(()),
        Err(e) => Err(router_unreachable(e).await),
    }
}
