//! The weave router's API as its clients see it, so the proxy and the CLI need neither the
//! router's data plane nor its crypto to talk to it.
//!
//! - [`addr`] (pure): the address grammar of `WEAVE_CIDR`, `weave attach/expose/...` and the API.
//! - [`types`] (pure): request and response bodies.
//! - [`client`] (shell): the HTTP client. Read-only routes go to TCP 127.0.0.1:6784; routes that
//!   change the network go to the unix socket [`client::DEFAULT_API_SOCKET`], which only root and
//!   the docker group can use.

pub mod addr;
pub mod client;
pub mod types;
