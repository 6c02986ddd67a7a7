//! `weave launch`: bridge, image, then the router (`weave`) and proxy (`weaveproxy`)
//! containers; returns once both answer.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bollard::models::{ContainerCreateBody, HostConfig, RestartPolicy, RestartPolicyNameEnum};
use bollard::query_parameters::{CreateContainerOptions, RemoveContainerOptions};
use bollard::Docker;
use weave_api::client::RouterClient;

use super::Exit;
use weave_api::addr::Ipv4Cidr;
use weave_router::ipam_shell::{self, DEFAULT_RANGE};

use crate::cli::{IpamArgs, LaunchArgs, ProxyOptions, DEFAULT_PROXY_SOCKET};
use crate::docker::{self, docker_socket_path};
use crate::image::{self, BINARY_IN_IMAGE};

pub const ROUTER_CONTAINER: &str = "weave";
pub const PROXY_CONTAINER: &str = "weaveproxy";
pub const BRIDGE: &str = "weave";
const READY_TIMEOUT: Duration = Duration::from_secs(60);

pub async fn run(args: LaunchArgs, router: &RouterClient) -> Result<()> {
    let docker = docker::connect().await?;
    if let Some(c) = docker::inspect(&docker, ROUTER_CONTAINER).await? {
        if docker::is_running(&c) {
            return Err(Exit::new(
                3,
                "weave is already running; you can stop it with 'weave stop'.",
            )
            .into());
        }
    }
    if router.get_text("/status").await.is_ok() {
        return Err(Exit::new(3, "Weave Net is already running").into());
    }
    let ipam_flags = ipam_flags(&args.ipam, args.peers.len())?;
    weave_router::create_bridge(BRIDGE, args.mtu)
        .await
        .context("creating the weave bridge")?;
    let image = image::ensure(&docker).await?;
    for dir in ["/var/run/weave", "/var/lib/weave"] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {dir}"))?;
    }

    let nickname = match &args.nickname {
        Some(n) => n.clone(),
        None => hostname(),
    };
    let docker_host = docker::docker_host();
    let mut router_cmd = vec![
        "router".to_string(),
        format!("--http-addr={}", router.addr()),
        format!("--api-socket={}", router.socket().display()),
        format!("--docker-api={docker_host}"),
        format!("--mtu={}", args.mtu),
        format!("--nickname={nickname}"),
    ];
    if args.proxy {
        router_cmd.push(format!("--proxy-addr={}", docker::proxy_url()));
    }
    router_cmd.extend(mesh_flags(&args));
    router_cmd.extend(ipam_flags);
    router_cmd.extend(args.peers.iter().cloned());
    let mut router_env = Vec::new();
    if let Some(password) = &args.password {
        router_env.push(format!("WEAVE_PASSWORD={password}"));
    }
    // Hidden: tests shorten the mesh's rekey period and IPAM's request timeout with them.
    for var in ["WEAVE_REKEY_INTERVAL", ipam_shell::REQUEST_TIMEOUT_ENV] {
        if let Some(v) = std::env::var(var).ok().filter(|v| !v.is_empty()) {
            router_env.push(format!("{var}={v}"));
        }
    }
    // Both daemons reach dockerd: the router to check that what it attaches is a container,
    // the proxy to forward the API.
    let mut binds = vec![
        "/var/run/weave:/var/run/weave".to_string(),
        "/var/lib/weave:/var/lib/weave".to_string(),
    ];
    if let Some(socket) = docker_socket_path(&docker_host) {
        binds.push(format!("{socket}:{socket}"));
    }
    let router_id = start_container(
        &docker,
        ROUTER_CONTAINER,
        daemon_spec(
            Daemon::Router,
            &image,
            router_cmd,
            router_env,
            binds.clone(),
            args.no_restart,
        ),
    )
    .await?;

    if args.proxy {
        let mut proxy_cmd = vec![
            "proxy".to_string(),
            format!("--http-addr={}", router.addr()),
            format!("--api-socket={}", router.socket().display()),
            format!("--docker-api={docker_host}"),
        ];
        proxy_cmd.extend(proxy_flags(&args.proxy_opts));
        start_container(
            &docker,
            PROXY_CONTAINER,
            daemon_spec(
                Daemon::Proxy,
                &image,
                proxy_cmd,
                Vec::new(),
                binds,
                args.no_restart,
            ),
        )
        .await?;
    }

    wait_until_ready(&docker, router, args.proxy).await?;
    if args.proxy {
        link_extra_sockets(&args.listen)?;
    }
    println!("{router_id}");
    Ok(())
}

/// The mesh flags to pass on to the router, in the daemon's own syntax.
fn mesh_flags(args: &LaunchArgs) -> Vec<String> {
    let mut flags = Vec::new();
    if args.no_discovery {
        flags.push("--no-discovery".to_string());
    }
    if let Some(n) = args.conn_limit {
        flags.push(format!("--conn-limit={n}"));
    }
    if let Some(subnets) = &args.trusted_subnets {
        flags.push(format!("--trusted-subnets={subnets}"));
    }
    flags
}

/// Check the IPAM flags now (so mistakes show before anything starts) and return them in the
/// router's syntax; the range defaults to 10.32.0.0/12. A range that overlaps a host route is an
/// error when it is the default, a warning when the user chose it.
fn ipam_flags(ipam: &IpamArgs, peers: usize) -> Result<Vec<String>> {
    let given = ipam.ipalloc_range.is_some();
    let range = ipam
        .ipalloc_range
        .clone()
        .unwrap_or_else(|| DEFAULT_RANGE.to_string());
    let settings = ipam_shell::settings(
        &range,
        ipam.ipalloc_default_subnet.as_deref(),
        ipam.ipalloc_init.as_deref(),
        peers,
    )
    .map_err(|e| Exit::new(1, e.to_string()))?;
    if let Some(settings) = &settings {
        let routes = std::fs::read_to_string("/proc/net/route")
            .map(|text| ipam_shell::parse_proc_net_route(&text))
            .unwrap_or_default();
        if let Some(msg) = route_overlap_message(&settings.range, given, &routes) {
            if given {
                eprintln!("{msg}");
            } else {
                return Err(Exit::new(1, msg).into());
            }
        }
    }
    let mut flags = vec![format!("--ipalloc-range={range}")];
    if let Some(subnet) = &ipam.ipalloc_default_subnet {
        flags.push(format!("--ipalloc-default-subnet={subnet}"));
    }
    if let Some(init) = &ipam.ipalloc_init {
        flags.push(format!("--ipalloc-init={init}"));
    }
    Ok(flags)
}

/// Weave's words when the range overlaps a route of the host (other than the default route
/// and weave's own bridge).
fn route_overlap_message(
    range: &Ipv4Cidr,
    given: bool,
    routes: &[ipam_shell::HostRoute],
) -> Option<String> {
    let route = ipam_shell::overlapping_route(range, routes, BRIDGE)?;
    Some(if given {
        format!(
            "WARNING: Specified --ipalloc-range {range} overlaps with existing route on host ({} via {}).\n\
             Unless this is deliberate, you must pick another range and set it on all hosts.",
            route.dest, route.iface
        )
    } else {
        format!(
            "ERROR: Default --ipalloc-range {range} overlaps with existing route on host ({} via {}).\n\
             You must pick another range and set it on all hosts.",
            route.dest, route.iface
        )
    })
}

/// The proxy flags to pass on, in the daemon's own syntax.
fn proxy_flags(opts: &ProxyOptions) -> Vec<String> {
    let mut flags = vec![
        format!("--hostname-match={}", opts.hostname_match),
        format!("--hostname-replacement={}", opts.hostname_replacement),
    ];
    if let Some(label) = &opts.hostname_from_label {
        flags.push(format!("--hostname-from-label={label}"));
    }
    for (on, flag) in [
        (opts.rewrite_inspect, "--rewrite-inspect"),
        (opts.no_default_ipalloc, "--no-default-ipalloc"),
        (opts.no_multicast_route, "--no-multicast-route"),
        (opts.without_dns, "--without-dns"),
        (opts.keep_tx_on, "--keep-tx-on"),
    ] {
        if on {
            flags.push(flag.to_string());
        }
    }
    flags
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Daemon {
    Router,
    Proxy,
}

impl Daemon {
    /// Exactly the capabilities each needs, after dropping all of them.
    fn capabilities(self) -> &'static [&'static str] {
        match self {
            // Netlink, iptables, SO_RCVBUFFORCE (NET_ADMIN); pcap and packet sockets (NET_RAW);
            // entering containers' network namespaces (SYS_ADMIN for setns, SYS_PTRACE to open
            // /proc/<pid>/ns of processes with other capabilities); giving the API socket to
            // the docker group (CHOWN).
            Daemon::Router => &["NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_PTRACE", "CHOWN"],
            // Giving its socket dockerd's socket's owner (CHOWN); killing the process of a
            // container whose attach failed, whatever its user (KILL).
            Daemon::Proxy => &["CHOWN", "KILL"],
        }
    }
}

/// Router and proxy share one shape: host network and pid namespaces (the router plumbs veths
/// into container namespaces by pid, the proxy kills a container's process whose attach
/// failed), weave's state dirs and dockerd's socket mounted, and all capabilities dropped but
/// those [`Daemon::capabilities`] lists (`--privileged` also fails where the host's bounding
/// set lacks a capability). The router needs /proc/sys writable and syscalls Docker's default
/// seccomp profile refuses (setns into other namespaces), so it runs unconfined; the proxy keeps
/// Docker's default seccomp and AppArmor profiles and masked paths.
fn daemon_spec(
    daemon: Daemon,
    image: &str,
    cmd: Vec<String>,
    env: Vec<String>,
    binds: Vec<String>,
    no_restart: bool,
) -> ContainerCreateBody {
    let router = daemon == Daemon::Router;
    let restart = if no_restart {
        RestartPolicyNameEnum::NO
    } else {
        RestartPolicyNameEnum::ALWAYS
    };
    ContainerCreateBody {
        image: Some(image.to_string()),
        entrypoint: Some(vec![BINARY_IN_IMAGE.to_string()]),
        cmd: Some(cmd),
        env: Some(env),
        labels: Some(HashMap::from([(
            "works.weave.role".into(),
            "system".into(),
        )])),
        host_config: Some(HostConfig {
            network_mode: Some("host".into()),
            pid_mode: Some("host".into()),
            cap_drop: Some(vec!["ALL".to_string()]),
            cap_add: Some(
                daemon
                    .capabilities()
                    .iter()
                    .map(|c| c.to_string())
                    .collect(),
            ),
            security_opt: router.then(|| {
                ["seccomp=unconfined", "apparmor=unconfined"]
                    .map(String::from)
                    .to_vec()
            }),
            // What `--security-opt systempaths=unconfined` means on the wire.
            masked_paths: router.then(Vec::new),
            readonly_paths: router.then(Vec::new),
            binds: Some(binds),
            restart_policy: Some(RestartPolicy {
                name: Some(restart),
                maximum_retry_count: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// (Re)create and start a daemon container; a stopped leftover is replaced so that new flags
/// and a new image take effect.
async fn start_container(docker: &Docker, name: &str, spec: ContainerCreateBody) -> Result<String> {
    if docker::inspect(docker, name).await?.is_some() {
        docker
            .remove_container(
                name,
                Some(RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                }),
            )
            .await
            .with_context(|| format!("removing the old {name} container"))?;
    }
    let created = docker
        .create_container(
            Some(CreateContainerOptions {
                name: Some(name.to_string()),
                ..Default::default()
            }),
            spec,
        )
        .await
        .with_context(|| format!("creating the {name} container"))?;
    docker
        .start_container(
            name,
            None::<bollard::query_parameters::StartContainerOptions>,
        )
        .await
        .with_context(|| format!("starting the {name} container"))?;
    Ok(created.id)
}

async fn wait_until_ready(docker: &Docker, router: &RouterClient, proxy: bool) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let router_ready = router.get_text("/status").await.is_ok();
        let proxy_ready = !proxy || Path::new(DEFAULT_PROXY_SOCKET).exists();
        if router_ready && proxy_ready {
            return Ok(());
        }
        for name in [ROUTER_CONTAINER, PROXY_CONTAINER] {
            if name == PROXY_CONTAINER && !proxy {
                continue;
            }
            let died = match docker::inspect(docker, name).await? {
                Some(c) => !docker::is_running(&c),
                None => true,
            };
            if died {
                return Err(Exit::new(
                    1,
                    format!(
                        "The {name} container has died. Consult the container logs for further details ('docker logs {name}')."
                    ),
                )
                .into());
            }
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "weave did not become ready within {}s; see 'docker logs {ROUTER_CONTAINER}' and 'docker logs {PROXY_CONTAINER}'",
                READY_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Extra `-H unix:///path` addresses become symlinks to the one real socket.
fn link_extra_sockets(listen: &[String]) -> Result<()> {
    for addr in listen {
        let path = addr.strip_prefix("unix://").unwrap_or(addr);
        if !path.starts_with('/') {
            return Err(Exit::new(
                1,
                "When launching the proxy, unix sockets must be specified as an absolute path.",
            )
            .into());
        }
        if path == DEFAULT_PROXY_SOCKET {
            continue;
        }
        let _ = std::fs::remove_file(path);
        std::os::unix::fs::symlink(DEFAULT_PROXY_SOCKET, path)
            .with_context(|| format!("linking {path} to {DEFAULT_PROXY_SOCKET}"))?;
    }
    Ok(())
}

pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "weave".into())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{ipam_flags, mesh_flags, route_overlap_message};
    use crate::cli::{Cli, Command};

    fn command(args: &[&str]) -> Command {
        match Cli::try_parse_from(args) {
            Ok(cli) => cli.command,
            Err(e) => panic!("{args:?}: {e}"),
        }
    }

    #[test]
    fn mesh_flags_reach_the_router() {
        let Command::Launch(launch) = command(&[
            "weave",
            "launch",
            "--no-discovery",
            "--conn-limit=3",
            "--trusted-subnets",
            "192.0.2.7/24,10.0.0.0/8",
            "h1",
        ]) else {
            panic!("not a launch");
        };
        let flags = mesh_flags(&launch);
        assert_eq!(
            flags,
            [
                "--no-discovery",
                "--conn-limit=3",
                "--trusted-subnets=192.0.2.0/24,10.0.0.0/8"
            ]
        );
        // What the router container runs accepts them.
        let mut router = vec!["weave", "router"];
        router.extend(flags.iter().map(String::as_str));
        router.push("h1");
        let Command::Router(r) = command(&router) else {
            panic!("not a router");
        };
        assert!(r.no_discovery);
        assert_eq!(r.conn_limit, 3);
        assert_eq!(
            r.trusted_subnets.map(|s| s.to_string()).as_deref(),
            Some("192.0.2.0/24,10.0.0.0/8")
        );
        assert_eq!(r.peers, ["h1"]);
        // IPAM: the default range always reaches the router, other flags when given, checked
        // first; the router parses what launch passes.
        let Command::Launch(launch) = command(&[
            "weave",
            "launch",
            "--iprange",
            "172.30.0.0/16",
            "--ipalloc-init",
            "consensus=3",
            "h1",
        ]) else {
            panic!("not a launch");
        };
        let flags = ipam_flags(&launch.ipam, 1).expect("valid");
        assert_eq!(
            flags,
            [
                "--ipalloc-range=172.30.0.0/16",
                "--ipalloc-init=consensus=3"
            ]
        );
        let mut router = vec!["weave", "router"];
        router.extend(flags.iter().map(String::as_str));
        let Command::Router(r) = command(&router) else {
            panic!("not a router");
        };
        assert_eq!(r.ipam.ipalloc_range.as_deref(), Some("172.30.0.0/16"));
        let Command::Launch(bad) = command(&[
            "weave",
            "launch",
            "--ipalloc-range=10.32.0.0/12",
            "--ipalloc-default-subnet=10.48.0.0/16",
        ]) else {
            panic!("not a launch");
        };
        let err = ipam_flags(&bad.ipam, 0).expect_err("outside the range");
        assert!(err.to_string().contains("does not overlap"), "{err}");
        let Command::Launch(off) = command(&["weave", "launch", "--ipalloc-range="]) else {
            panic!("not a launch");
        };
        assert_eq!(
            ipam_flags(&off.ipam, 0).expect("IPAM off"),
            ["--ipalloc-range="]
        );
        // Nothing given: nothing passed (the router's defaults apply).
        let Command::Launch(plain) = command(&["weave", "launch"]) else {
            panic!("not a launch");
        };
        assert!(mesh_flags(&plain).is_empty());
    }

    #[test]
    fn a_range_over_a_host_route() {
        let routes = vec![
            weave_router::ipam_shell::HostRoute {
                iface: "eth1".into(),
                dest: "10.40.0.0/16".parse().expect("cidr"),
            },
            weave_router::ipam_shell::HostRoute {
                iface: "weave".into(),
                dest: "10.36.0.0/16".parse().expect("cidr"),
            },
        ];
        let default: weave_api::addr::Ipv4Cidr = "10.32.0.0/12".parse().expect("cidr");
        let err = route_overlap_message(&default, false, &routes).expect("overlap");
        assert!(
            err.starts_with("ERROR: Default --ipalloc-range 10.32.0.0/12 overlaps with existing route on host (10.40.0.0/16 via eth1)."),
            "{err}"
        );
        let warn = route_overlap_message(&default, true, &routes).expect("overlap");
        assert!(warn.starts_with("WARNING: Specified"), "{warn}");
        let elsewhere: weave_api::addr::Ipv4Cidr = "172.30.0.0/16".parse().expect("cidr");
        assert_eq!(route_overlap_message(&elsewhere, false, &routes), None);
    }
}
