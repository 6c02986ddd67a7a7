//! The iptables rules the bridge needs (shell: runs the `iptables` binary). Spec router §5.4/§5.5.
//!
//! - filter `FORWARD`, kept at the top in this order: `-i docker0 -o weave DROP` (containers
//!   on Docker's bridge stay off the weave network), `-i weave -o weave ACCEPT`,
//!   `-o weave -j WEAVE-EXPOSE`, `-i weave ! -o weave ACCEPT`,
//!   `-o weave -m conntrack --ctstate RELATED,ESTABLISHED ACCEPT`. dockerd sets the FORWARD
//!   policy to DROP and bridge-nf-call-iptables=1, so without them containers on the weave bridge
//!   cannot talk.
//! - filter chain `WEAVE-INPUT`, hooked first in `INPUT` (Weave's host protections): drop
//!   connections to the API on 127.0.0.1:6784 from non-local sources (its fix for
//!   CVE-2020-8558: with `route_localnet` a neighbour could reach 127.0.0.1), and drop
//!   containers on `docker0` reaching the mesh ports (TCP and UDP 6783, UDP 6784) on the
//!   `docker0` address.
//! - filter chain `WEAVE-EXPOSE`: `-d <subnet> ACCEPT` per exposed subnet.
//! - nat chain `WEAVE` (hooked from `POSTROUTING`): per exposed subnet C
//!   `-s C -d 224.0.0.0/4 RETURN`, `-d C ! -s C MASQUERADE`, `-s C ! -d C MASQUERADE`.
//!
//! Every operation is idempotent: rules are checked with `-C` before they are added, and deleted
//! with `-D` until none is left. Rules act in the network namespace of the calling thread.

use std::io;
use std::process::Output;

use tokio::process::Command;

use crate::addr::Ipv4Cidr;

const IPTABLES: &str = "iptables";
/// filter chain holding one ACCEPT per exposed subnet.
pub const EXPOSE_CHAIN: &str = "WEAVE-EXPOSE";
/// nat chain holding the masquerading rules of exposed subnets.
pub const NAT_CHAIN: &str = "WEAVE";
/// filter chain of the host protections, hooked first in `INPUT`.
pub const INPUT_CHAIN: &str = "WEAVE-INPUT";
/// Docker's default bridge (Weave's `DOCKER_BRIDGE`).
pub const DOCKER_BRIDGE: &str = "docker0";
/// Weave's comment on the API port rule, kept so that operators recognise it.
const API_PORT_COMMENT: &str = "Block non-local access to Weave Net control port";
/// Upper bound on `-D` repetitions when removing duplicates of a rule.
const MAX_DUPLICATES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("the {IPTABLES} command was not found: install iptables")]
    NotFound,
    #[error("running `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
}

type Rule = Vec<String>;

fn rule(parts: &[&str]) -> Rule {
    parts.iter().map(|p| p.to_string()).collect()
}

/// The FORWARD rules for `bridge`, in the order they must appear at the top of the chain.
fn forward_rules(bridge: &str) -> Vec<Rule> {
    let mut rules = Vec::new();
    if bridge != DOCKER_BRIDGE {
        rules.push(rule(&["-i", DOCKER_BRIDGE, "-o", bridge, "-j", "DROP"]));
    }
    rules.extend([
        rule(&["-i", bridge, "-o", bridge, "-j", "ACCEPT"]),
        rule(&["-o", bridge, "-j", EXPOSE_CHAIN]),
        rule(&["-i", bridge, "!", "-o", bridge, "-j", "ACCEPT"]),
        rule(&[
            "-o",
            bridge,
            "-m",
            "conntrack",
            "--ctstate",
            "RELATED,ESTABLISHED",
            "-j",
            "ACCEPT",
        ]),
    ]);
    rules
}

/// What the host protections guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostPorts {
    /// The API's TCP address; guarded when it is on loopback.
    pub api: std::net::SocketAddr,
    /// The mesh port (TCP and UDP), and the port above it (UDP, Weave's fastdp port).
    pub mesh: u16,
    /// The address of Docker's bridge, when there is one.
    pub docker_bridge_ip: Option<std::net::Ipv4Addr>,
}

/// The rules of [`INPUT_CHAIN`].
fn input_rules(ports: &HostPorts) -> Vec<Rule> {
    let mut rules = Vec::new();
    if ports.api.ip().is_loopback() {
        let dst = ports.api.ip().to_string();
        let port = ports.api.port().to_string();
        rules.push(rule(&[
            "-p",
            "tcp",
            "-d",
            &dst,
            "--dport",
            &port,
            "-m",
            "addrtype",
            "!",
            "--src-type",
            "LOCAL",
            "-m",
            "conntrack",
            "!",
            "--ctstate",
            "RELATED,ESTABLISHED",
            "-m",
            "comment",
            "--comment",
            API_PORT_COMMENT,
            "-j",
            "DROP",
        ]));
    }
    if let Some(ip) = ports.docker_bridge_ip {
        let dst = ip.to_string();
        let mesh = ports.mesh.to_string();
        let above = ports.mesh.saturating_add(1).to_string();
        for (proto, port) in [("tcp", &mesh), ("udp", &mesh), ("udp", &above)] {
            rules.push(rule(&[
                "-i",
                DOCKER_BRIDGE,
                "-p",
                proto,
                "-d",
                &dst,
                "--dport",
                port,
                "-j",
                "DROP",
            ]));
        }
    }
    rules
}

/// Install the host protections: [`INPUT_CHAIN`] refilled (Docker's bridge may have a new
/// address) and hooked first in `INPUT`.
pub async fn ensure_input_rules(ports: &HostPorts) -> Result<(), IptablesError> {
    ensure_chain("filter", INPUT_CHAIN).await?;
    must(&with("filter", "-F", INPUT_CHAIN, &[])).await?;
    for r in input_rules(ports) {
        must(&with("filter", "-A", INPUT_CHAIN, &r)).await?;
    }
    let hook = rule(&["-j", INPUT_CHAIN]);
    if !exists("filter", "INPUT", &hook).await? {
        let mut args = with("filter", "-I", "INPUT", &["1".to_string()]);
        args.extend_from_slice(&hook);
        must(&args).await?;
    }
    Ok(())
}

/// The nat `WEAVE` rules for an exposed subnet.
fn nat_rules(cidr: Ipv4Cidr) -> Vec<Rule> {
    let c = cidr.network().to_string();
    vec![
        rule(&["-s", &c, "-d", "224.0.0.0/4", "-j", "RETURN"]),
        rule(&["-d", &c, "!", "-s", &c, "-j", "MASQUERADE"]),
        rule(&["-s", &c, "!", "-d", &c, "-j", "MASQUERADE"]),
    ]
}

/// The filter `WEAVE-EXPOSE` rule for an exposed subnet.
fn expose_filter_rule(cidr: Ipv4Cidr) -> Rule {
    rule(&["-d", &cidr.network().to_string(), "-j", "ACCEPT"])
}

fn render(args: &[String]) -> String {
    std::iter::once(IPTABLES)
        .chain(args.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Run iptables with `args` (plus `-w` to wait for the xtables lock).
async fn run(args: &[String]) -> Result<Output, IptablesError> {
    let output = Command::new(IPTABLES)
        .arg("-w")
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                IptablesError::NotFound
            } else {
                IptablesError::Spawn {
                    command: render(args),
                    source,
                }
            }
        })?;
    Ok(output)
}

/// Run and require success.
async fn must(args: &[String]) -> Result<(), IptablesError> {
    let output = run(args).await?;
    if output.status.success() {
        return Ok(());
    }
    Err(IptablesError::Failed {
        command: render(args),
        status: output.status.to_string(),
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
    })
}

fn with(table: &str, op: &str, chain: &str, rest: &[String]) -> Vec<String> {
    let mut args = vec![
        "-t".to_string(),
        table.to_string(),
        op.to_string(),
        chain.to_string(),
    ];
    args.extend_from_slice(rest);
    args
}

/// Does the rule exist? (`-C` exits 1 when it does not.)
async fn exists(table: &str, chain: &str, rule: &[String]) -> Result<bool, IptablesError> {
    let args = with(table, "-C", chain, rule);
    let output = run(&args).await?;
    match output.status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => Err(IptablesError::Failed {
            command: render(&args),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        }),
    }
}

async fn chain_exists(table: &str, chain: &str) -> Result<bool, IptablesError> {
    Ok(run(&with(table, "-S", chain, &[])).await?.status.success())
}

async fn ensure_chain(table: &str, chain: &str) -> Result<(), IptablesError> {
    if !chain_exists(table, chain).await? {
        let args = with(table, "-N", chain, &[]);
        let output = run(&args).await?;
        // Lost a race with another creator: fine if it exists now.
        if !output.status.success() && !chain_exists(table, chain).await? {
            return Err(IptablesError::Failed {
                command: render(&args),
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
    }
    Ok(())
}

async fn append_unique(table: &str, chain: &str, rule: &[String]) -> Result<(), IptablesError> {
    if !exists(table, chain, rule).await? {
        must(&with(table, "-A", chain, rule)).await?;
    }
    Ok(())
}

/// Delete every copy of `rule`; a missing rule or chain is fine.
async fn delete_all(table: &str, chain: &str, rule: &[String]) -> Result<(), IptablesError> {
    for _ in 0..MAX_DUPLICATES {
        if !exists(table, chain, rule).await? {
            return Ok(());
        }
        must(&with(table, "-D", chain, rule)).await?;
    }
    Ok(())
}

/// Flush and delete `chain`; absent is fine.
async fn remove_chain(table: &str, chain: &str) -> Result<(), IptablesError> {
    if chain_exists(table, chain).await? {
        must(&with(table, "-F", chain, &[])).await?;
        must(&with(table, "-X", chain, &[])).await?;
    }
    Ok(())
}

/// Install the FORWARD rules for `bridge` (and the `WEAVE-EXPOSE` and nat `WEAVE` chains they
/// and expose need). Idempotent; missing rules are inserted at their place at the top.
pub async fn ensure_forward_rules(bridge: &str) -> Result<(), IptablesError> {
    ensure_chain("filter", EXPOSE_CHAIN).await?;
    for (i, r) in forward_rules(bridge).iter().enumerate() {
        if !exists("filter", "FORWARD", r).await? {
            let mut args = with("filter", "-I", "FORWARD", &[(i + 1).to_string()]);
            args.extend_from_slice(r);
            must(&args).await?;
        }
    }
    ensure_chain("nat", NAT_CHAIN).await?;
    append_unique("nat", "POSTROUTING", &rule(&["-j", NAT_CHAIN])).await?;
    Ok(())
}

/// Remove the FORWARD rules for `bridge`.
pub async fn remove_forward_rules(bridge: &str) -> Result<(), IptablesError> {
    // iptables refuses to even check a rule that jumps to a missing chain.
    let expose_chain = chain_exists("filter", EXPOSE_CHAIN).await?;
    for r in forward_rules(bridge) {
        if !expose_chain && r.iter().any(|part| part == EXPOSE_CHAIN) {
            continue;
        }
        delete_all("filter", "FORWARD", &r).await?;
    }
    Ok(())
}

/// Empty the expose chains (the router re-exposes what is on the bridge at start).
pub async fn flush_expose_rules() -> Result<(), IptablesError> {
    for (table, chain) in [("filter", EXPOSE_CHAIN), ("nat", NAT_CHAIN)] {
        if chain_exists(table, chain).await? {
            must(&with(table, "-F", chain, &[])).await?;
        }
    }
    Ok(())
}

/// Let the host reach the subnet of `cidr` on the bridge: ACCEPT in `WEAVE-EXPOSE` and, unless
/// `skip_nat`, masquerading in nat `WEAVE`.
pub async fn expose_rules(
    bridge: &str,
    cidr: Ipv4Cidr,
    skip_nat: bool,
) -> Result<(), IptablesError> {
    ensure_forward_rules(bridge).await?;
    append_unique("filter", EXPOSE_CHAIN, &expose_filter_rule(cidr)).await?;
    if !skip_nat {
        for r in nat_rules(cidr) {
            append_unique("nat", NAT_CHAIN, &r).await?;
        }
    }
    Ok(())
}

/// Undo [`expose_rules`] for `cidr`.
pub async fn hide_rules(cidr: Ipv4Cidr) -> Result<(), IptablesError> {
    if chain_exists("filter", EXPOSE_CHAIN).await? {
        delete_all("filter", EXPOSE_CHAIN, &expose_filter_rule(cidr)).await?;
    }
    if chain_exists("nat", NAT_CHAIN).await? {
        for r in nat_rules(cidr) {
            delete_all("nat", NAT_CHAIN, &r).await?;
        }
    }
    Ok(())
}

/// `weave reset`: every rule and chain above.
pub async fn remove_all(bridge: &str) -> Result<(), IptablesError> {
    remove_forward_rules(bridge).await?;
    if chain_exists("filter", INPUT_CHAIN).await? {
        delete_all("filter", "INPUT", &rule(&["-j", INPUT_CHAIN])).await?;
    }
    remove_chain("filter", INPUT_CHAIN).await?;
    if chain_exists("nat", NAT_CHAIN).await? {
        delete_all("nat", "POSTROUTING", &rule(&["-j", NAT_CHAIN])).await?;
    }
    remove_chain("filter", EXPOSE_CHAIN).await?;
    remove_chain("nat", NAT_CHAIN).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_rules_in_order() {
        let rules: Vec<String> = forward_rules("weave").iter().map(|r| r.join(" ")).collect();
        assert_eq!(
            rules,
            [
                "-i docker0 -o weave -j DROP",
                "-i weave -o weave -j ACCEPT",
                "-o weave -j WEAVE-EXPOSE",
                "-i weave ! -o weave -j ACCEPT",
                "-o weave -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            ]
        );
    }

    #[test]
    fn expose_rules_use_the_subnet() {
        let c: Ipv4Cidr = "10.2.1.7/24".parse().expect("valid");
        let nat: Vec<String> = nat_rules(c).iter().map(|r| r.join(" ")).collect();
        assert_eq!(
            nat,
            [
                "-s 10.2.1.0/24 -d 224.0.0.0/4 -j RETURN",
                "-d 10.2.1.0/24 ! -s 10.2.1.0/24 -j MASQUERADE",
                "-s 10.2.1.0/24 ! -d 10.2.1.0/24 -j MASQUERADE",
            ]
        );
        assert_eq!(expose_filter_rule(c).join(" "), "-d 10.2.1.0/24 -j ACCEPT");
    }

    #[test]
    fn docker_bridge_is_not_dropped_from_itself() {
        let rules: Vec<String> = forward_rules("docker0")
            .iter()
            .map(|r| r.join(" "))
            .collect();
        assert!(!rules.iter().any(|r| r.contains("DROP")), "{rules:?}");
    }

    #[test]
    fn input_rules_guard_the_api_and_the_mesh_ports() {
        let ports = HostPorts {
            api: "127.0.0.1:6784".parse().expect("addr"),
            mesh: 6783,
            docker_bridge_ip: Some("172.17.0.1".parse().expect("ip")),
        };
        let rules: Vec<String> = input_rules(&ports).iter().map(|r| r.join(" ")).collect();
        assert_eq!(
            rules,
            [
                "-p tcp -d 127.0.0.1 --dport 6784 -m addrtype ! --src-type LOCAL -m conntrack ! --ctstate RELATED,ESTABLISHED -m comment --comment Block non-local access to Weave Net control port -j DROP",
                "-i docker0 -p tcp -d 172.17.0.1 --dport 6783 -j DROP",
                "-i docker0 -p udp -d 172.17.0.1 --dport 6783 -j DROP",
                "-i docker0 -p udp -d 172.17.0.1 --dport 6784 -j DROP",
            ]
        );
        // No Docker bridge, API not on loopback: nothing to guard.
        let none = HostPorts {
            api: "0.0.0.0:6784".parse().expect("addr"),
            mesh: 6783,
            docker_bridge_ip: None,
        };
        assert!(input_rules(&none).is_empty());
    }

    #[test]
    fn command_rendering() {
        let args = with("nat", "-A", "WEAVE", &rule(&["-j", "RETURN"]));
        assert_eq!(render(&args), "iptables -t nat -A WEAVE -j RETURN");
    }
}
