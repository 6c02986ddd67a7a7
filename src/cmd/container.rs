//! `weave attach`, `detach`, `ps`, `run`, `expose`, `hide`: thin calls to the router API, which
//! is the one place that touches the bridge.

use std::net::Ipv4Addr;
use std::process::Stdio;

use anyhow::{Context, Result};
use bollard::query_parameters::ListContainersOptions;
use weave_api::addr::{AddrSpec, Ipv4Cidr};
use weave_api::client::{ClientError, RouterClient};
use weave_api::types::{AttachRequest, DetachRequest};

use super::{router_unreachable, Exit};
use crate::cli::AttachArgs;
use crate::docker;

/// Splits `[addr...] <container>`.
fn addrs_then_container(args: &[String]) -> Result<(Vec<AddrSpec>, &str)> {
    let (container, addrs) = args
        .split_last()
        .ok_or_else(|| Exit::new(1, "a container is required"))?;
    let addrs = parse_addrs(addrs)?;
    Ok((addrs, container))
}

fn parse_addrs(args: &[String]) -> Result<Vec<AddrSpec>> {
    args.iter()
        .map(|a| {
            a.parse::<AddrSpec>()
                .map_err(|e| Exit::new(1, format!("Invalid address {a:?}: {e}")).into())
        })
        .collect()
}

fn ip_of(cidr: &str) -> &str {
    cidr.split_once('/').map_or(cidr, |(ip, _)| ip)
}

pub async fn attach(router: &RouterClient, args: AttachArgs) -> Result<()> {
    let (mut addrs, container) = addrs_then_container(&args.args)?;
    if addrs.is_empty() {
        addrs.push(AddrSpec::DefaultSubnet);
    }
    let docker = docker::connect().await?;
    let (id, pid) = docker::running_container(&docker, container).await?;
    let request = AttachRequest {
        pid,
        addrs: addrs.clone(),
        no_multicast_route: args.no_multicast_route,
        keep_tx_on: false,
    };
    let reply = match router.attach(&id, &request).await {
        Ok(reply) => reply,
        Err(e) => return Err(router_unreachable(e).await),
    };
    println!("{}", requested_ips(&addrs, &reply.addrs).join(" "));
    Ok(())
}

/// The addresses this attach asked for, in the order asked; when some came from IPAM, every
/// address the interface has.
fn requested_ips(requested: &[AddrSpec], present: &[String]) -> Vec<String> {
    let explicit: Option<Vec<Ipv4Addr>> = requested
        .iter()
        .map(|spec| match spec {
            AddrSpec::Explicit(cidr) => Some(cidr.addr),
            _ => None,
        })
        .collect();
    match explicit {
        Some(ips) => ips.iter().map(ToString::to_string).collect(),
        None => present.iter().map(|c| ip_of(c).to_string()).collect(),
    }
}

pub async fn detach(router: &RouterClient, args: &[String]) -> Result<()> {
    let (addrs, container) = addrs_then_container(args)?;
    let docker = docker::connect().await?;
    let (id, pid) = docker::running_container(&docker, container).await?;
    let reply = match router.detach(&id, &DetachRequest { pid, addrs }).await {
        Ok(reply) => reply,
        Err(e) => return Err(router_unreachable(e).await),
    };
    let ips: Vec<&str> = reply.removed.iter().map(|c| ip_of(c)).collect();
    println!("{}", ips.join(" "));
    Ok(())
}

pub async fn ps(router: &RouterClient, containers: &[String]) -> Result<()> {
    let docker = docker::connect().await?;
    let mut targets: Vec<String> = containers.to_vec();
    if targets.is_empty() {
        targets.push("weave:expose".into());
        let running = docker
            .list_containers(None::<ListContainersOptions>)
            .await
            .context("listing containers")?;
        targets.extend(running.into_iter().filter_map(|c| c.id));
    }
    for target in targets {
        let label: String = target.chars().take(12).collect();
        let iface = if target == "weave:expose" {
            router.interfaces("weave:expose").await
        } else {
            let Ok((_, pid)) = docker::running_container(&docker, &target).await else {
                continue;
            };
            router.interfaces(&pid.to_string()).await
        };
        match iface {
            Ok(Some(iface)) => {
                let mut line = format!("{label} {}", iface.mac);
                for addr in &iface.addrs {
                    line.push(' ');
                    line.push_str(addr);
                }
                println!("{line}");
            }
            Ok(None) => {}
            Err(e) => return Err(router_unreachable(e).await),
        }
    }
    Ok(())
}

/// `weave run [addr...] <docker run args>`: `docker run -d` on dockerd itself, then attach.
pub async fn run(router: &RouterClient, args: &[String]) -> Result<()> {
    let split = args
        .iter()
        .position(|a| a.parse::<AddrSpec>().is_err())
        .unwrap_or(args.len());
    let (addr_args, docker_args) = args.split_at(split);
    if docker_args.is_empty() {
        return Err(Exit::new(1, "usage: weave run [addr...] <docker run args>").into());
    }
    let output = std::process::Command::new("docker")
        .arg("run")
        .arg("-d")
        .args(docker_args)
        .env("DOCKER_HOST", docker::docker_host())
        .stderr(Stdio::inherit())
        .output()
        .context("running docker (is the docker client installed?)")?;
    if !output.status.success() {
        return Err(Exit::new(output.status.code().unwrap_or(1), "").into());
    }
    let id = String::from_utf8_lossy(&output.stdout).trim().to_string();
    attach(
        router,
        AttachArgs {
            without_dns: false,
            no_multicast_route: false,
            rewrite_hosts: false,
            args: addr_args.iter().cloned().chain([id.clone()]).collect(),
        },
    )
    .await?;
    println!("{id}");
    Ok(())
}

/// The bridge's ident in IPAM.
const EXPOSE_IDENT: &str = "weave:expose";
const IPAM_OFF: &str = "IP address allocation must be enabled to use 'net:' (weave was launched with --ipalloc-range \"\"): give an explicit address such as 10.32.1.254/24";

/// An IPAM answer for the CLI: 404 means IPAM is off, other refusals carry the router's reason.
async fn ipam_failure(e: ClientError) -> anyhow::Error {
    match e {
        ClientError::Status { status: 404, .. } => Exit::new(1, IPAM_OFF).into(),
        ClientError::Status { message, .. } => Exit::new(1, message.trim_end()).into(),
        other => router_unreachable(other).await,
    }
}

/// The host's address for one spec: explicit ones claimed (ignored when IPAM is off), `net:`
/// ones allocated, for the ident `weave:expose`.
async fn expose_addr(router: &RouterClient, spec: AddrSpec) -> Result<Ipv4Cidr> {
    let subnet = match spec {
        AddrSpec::Explicit(cidr) => {
            return match router.claim(EXPOSE_IDENT, cidr, false).await {
                Ok(_) | Err(ClientError::Status { status: 404, .. }) => Ok(cidr),
                Err(e) => Err(ipam_failure(e).await),
            };
        }
        AddrSpec::Subnet(subnet) => Some(subnet),
        AddrSpec::DefaultSubnet => None,
    };
    match router.allocate(EXPOSE_IDENT, subnet, false).await {
        Ok(Some(cidr)) => Ok(cidr),
        Ok(None) => Err(Exit::new(1, "the allocation was cancelled").into()),
        Err(e) => Err(ipam_failure(e).await),
    }
}

pub async fn expose(router: &RouterClient, args: &[String], fqdn: Option<&str>) -> Result<()> {
    let mut specs = parse_addrs(args)?;
    if specs.is_empty() {
        specs.push(AddrSpec::DefaultSubnet);
    }
    if fqdn.is_some() {
        eprintln!("Warning: -h is ignored: weaveDNS is not available yet");
    }
    let mut cidrs = Vec::with_capacity(specs.len());
    for spec in specs {
        let cidr = expose_addr(router, spec).await?;
        if let Err(e) = router.expose(cidr).await {
            return Err(router_unreachable(e).await);
        }
        cidrs.push(cidr);
    }
    let ips: Vec<String> = cidrs.iter().map(|c| c.addr.to_string()).collect();
    println!("{}", ips.join(" "));
    Ok(())
}

/// `weave hide [addr...]`: no address means the bridge's IPAM addresses in the default subnet.
pub async fn hide(router: &RouterClient, args: &[String]) -> Result<()> {
    let mut specs = parse_addrs(args)?;
    if specs.is_empty() {
        specs.push(AddrSpec::DefaultSubnet);
    }
    let mut cidrs: Vec<Ipv4Cidr> = Vec::new();
    for spec in specs {
        let found = match spec {
            AddrSpec::Explicit(cidr) => Ok(vec![cidr]),
            AddrSpec::Subnet(subnet) => router.lookup(EXPOSE_IDENT, Some(subnet)).await,
            AddrSpec::DefaultSubnet => router.lookup(EXPOSE_IDENT, None).await,
        };
        let found = match found {
            Ok(found) => found,
            Err(e) => return Err(ipam_failure(e).await),
        };
        for cidr in found {
            if !cidrs.contains(&cidr) {
                cidrs.push(cidr);
            }
        }
    }
    for cidr in &cidrs {
        if let Err(e) = router.hide(*cidr).await {
            return Err(router_unreachable(e).await);
        }
        // Addresses IPAM never handed out (IPAM off, or outside its range) are not found: fine.
        let _ = router.free(EXPOSE_IDENT, cidr.addr).await;
    }
    let ips: Vec<String> = cidrs.iter().map(|c| c.addr.to_string()).collect();
    println!("{}", ips.join(" "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_addresses_from_the_container() {
        let args: Vec<String> = ["10.2.1.1/24", "ip:10.2.2.1/24", "c1"]
            .map(String::from)
            .to_vec();
        let (addrs, container) = addrs_then_container(&args).expect("valid");
        assert_eq!(container, "c1");
        assert_eq!(addrs.len(), 2);
        let bad: Vec<String> = ["10.2.1/24", "c1"].map(String::from).to_vec();
        assert!(addrs_then_container(&bad).is_err());
    }

    #[test]
    fn prints_requested_ips_in_order() {
        let requested: Vec<AddrSpec> = ["10.2.2.1/24", "10.2.1.1/24"]
            .iter()
            .map(|s| s.parse().expect("valid"))
            .collect();
        let present = vec!["10.2.1.1/24".to_string(), "10.2.2.1/24".to_string()];
        assert_eq!(
            requested_ips(&requested, &present),
            ["10.2.2.1", "10.2.1.1"]
        );
        assert_eq!(
            requested_ips(&[AddrSpec::DefaultSubnet], &present),
            ["10.2.1.1", "10.2.2.1"]
        );
    }
}
