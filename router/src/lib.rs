//! The weave router: one per host. Today it owns the `weave` bridge, attaches containers to it,
//! installs the iptables rules the bridge needs, and serves the HTTP API on 127.0.0.1:6784 that
//! the CLI and the proxy use. The mesh (gossip over TCP 6783) and the sleeve (pcap + UDP) plug in
//! here next.
//!
//! Pure modules (no IO, unit-tested without root): [`addr`], [`api_types`], [`status`].
//! Shells: [`bridge`] (the only place that talks rtnetlink), [`iptables`], [`api`] (HTTP server),
//! [`client`] (HTTP client used by the CLI and the proxy).

pub mod addr;
pub mod api_types;
