//! Request/response bodies of the router's HTTP API (127.0.0.1:6784) that are ours rather than
//! Weave's. Shared by the router (server side), the proxy and the CLI (clients), so they are
//! defined exactly once. Pure serde types.

use serde::{Deserialize, Serialize};

use crate::addr::AddrSpec;

/// `POST /attach/{container_id}`: give the container whose init process is `pid` an `ethwe`
/// interface on the weave bridge with these addresses. Idempotent: existing addresses stay,
/// only missing ones are added.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachRequest {
    pub pid: i32,
    pub addrs: Vec<AddrSpec>,
    #[serde(default)]
    pub no_multicast_route: bool,
    #[serde(default)]
    pub keep_tx_on: bool,
}

/// Reply to attach (200): the interface's MAC and every address it now has, as `ip/len`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachResponse {
    pub mac: String,
    pub addrs: Vec<String>,
}

/// `POST /detach/{container_id}`: remove these addresses (all of them when empty); the veth goes
/// when no address is left.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetachRequest {
    pub pid: i32,
    #[serde(default)]
    pub addrs: Vec<AddrSpec>,
}

/// Reply to detach (200): the addresses removed, as `ip/len`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetachResponse {
    pub removed: Vec<String>,
}

/// `GET /interfaces/{pid}` (200) or `GET /interfaces/weave:expose` (the bridge itself); 404 when
/// that netns has no weave interface. Used by `weave ps`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceInfo {
    pub mac: String,
    pub addrs: Vec<String>,
}

/// A JSON error body (`{"message": ...}`), the shape Docker uses, so the proxy can pass the text
/// straight to Docker clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub message: String,
}
