//! Multi-host test harness for weave: each simulated host is a network namespace with its own
//! mount namespace, hostname and dockerd, entered with `nsenter`. Needs root.
//!
//! - [`Host`] (`host.rs`, shell): start a host, run `weave`, `docker` (straight to dockerd or
//!   through the weave proxy, with each installed [`DockerClient`]), shell scripts, background
//!   commands; tears everything down on drop.
//! - [`Cluster`] / [`Underlay`] (`cluster.rs`, shell): hosts on one simulated LAN
//!   (192.0.2.0/24), and partitions between them.
//! - [`Cmd`], [`Out`], [`Background`] (`exec.rs`): commands with time-outs, their output, and
//!   long-running children killed on drop.
//! - [`eventually`] (`wait.rs`, pure but for the sleep): polling with patience from
//!   `WEAVE_TEST_PATIENCE_SECS`; [`never`] for negative checks, which must show their probe
//!   ran, over a [`quiet_period`] on the same scale.
//! - `run.rs`: the per-run id and directory, and the sweep of dead runs' leftovers.
//! - `image.rs`: the busybox image tarball and build contexts.
//!
//! Names: every netns, cgroup and directory a run creates is `wv<4 hex run id><h|u><n>`; the
//! sweep at start-up removes such leftovers only when their owning process is dead.
//!
//! Environment: `WEAVE_BIN` (the weave binary, default `target/<profile>/weave`),
//! `WEAVE_TEST_PATIENCE_SECS` (default 30), `WEAVE_TEST_DIR` (default `/var/tmp/weave-integ`),
//! `WEAVE_TEST_BUSYBOX` (a static busybox, default `/bin/busybox`).

mod cluster;
mod exec;
mod host;
pub mod image;
mod run;
mod sys;
mod wait;
pub mod weave;

pub use cluster::{underlay_addr, Cluster, Underlay, UNDERLAY_IFACE, UNDERLAY_PREFIX};
pub use exec::{default_timeout, Background, Cmd, Out};
pub use host::{
    docker_ping, in_ci, weave_bin, DockerClient, Host, Via, DOCKER_SOCKET, PROXY_DOCKER_HOST,
    PROXY_SOCKET, WEAVE_BIN_ENV,
};
pub use run::{base_dir, sweep, RunDir, TEST_DIR_ENV};
pub use wait::{eventually, eventually_true, never, patience, quiet_period, GiveUp, PATIENCE_ENV};

/// Parses what `weave env` prints (`export DOCKER_HOST=... ORIG_DOCKER_HOST=...`, maybe over
/// several lines) into variable assignments, as `eval $(weave env)` would apply them.
pub fn parse_env_exports(text: &str) -> Vec<(String, String)> {
    let mut vars = Vec::new();
    for word in text.split_whitespace() {
        if word == "export" || word == "unset" {
            continue;
        }
        if let Some((key, value)) = word.split_once('=') {
            let value = value.trim_matches(|c| c == '"' || c == '\'');
            vars.push((key.to_string(), value.to_string()));
        }
    }
    vars
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weave_env_output_parses() {
        let vars = parse_env_exports(
            "export DOCKER_HOST=unix:///var/run/weave/weave.sock ORIG_DOCKER_HOST=\n",
        );
        assert_eq!(
            vars,
            vec![
                (
                    "DOCKER_HOST".to_string(),
                    "unix:///var/run/weave/weave.sock".to_string()
                ),
                ("ORIG_DOCKER_HOST".to_string(), String::new()),
            ]
        );
    }
}
