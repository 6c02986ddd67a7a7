//! The `weave` command line (clap derive). Parsing only; each command runs in `cmd/`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use weave_api::addr::{parse_cidr_list, AddrError, Ipv4Cidr};

pub const DEFAULT_PROXY_SOCKET: &str = "/var/run/weave/weave.sock";

#[derive(Debug, Parser)]
#[command(
    name = "weave",
    about = "Weave Net: one virtual Ethernet switch for the containers of every host",
    version,
    disable_version_flag = true
)]
pub struct Cli {
    /// The router's control API (Weave's WEAVE_HTTP_ADDR).
    #[arg(long, env = "WEAVE_HTTP_ADDR", default_value = weave_api::client::DEFAULT_HTTP_ADDR, global = true, hide = true)]
    pub http_addr: SocketAddr,

    /// The router's unix socket for changes (root and the docker group only).
    #[arg(long, env = "WEAVE_API_SOCKET", default_value = weave_api::client::DEFAULT_API_SOCKET, global = true, hide = true)]
    pub api_socket: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the weave bridge and start the router (container `weave`) and the proxy
    /// (container `weaveproxy`).
    Launch(LaunchArgs),
    /// Stop the router and the proxy; attached containers keep talking on this host.
    Stop,
    /// Stop weave and remove its containers, bridge, iptables rules and state.
    Reset {
        /// Reset even when weave is not running.
        #[arg(long)]
        force: bool,
    },
    /// Print the shell commands that point the docker client at the weave proxy.
    Env {
        /// Print the command that points the docker client back at dockerd.
        #[arg(long)]
        restore: bool,
    },
    /// Print the docker client flag that points it at the weave proxy.
    Config,
    /// Show the status of the router and proxy.
    Status {
        /// targets, connections, peers, dns or ipam
        sub: Option<String>,
    },
    /// Show everything weave knows, as JSON.
    Report {
        /// A template such as `{{.Router.Name}}` or `{{len .Router.Peers}}`.
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
    },
    /// List weave interfaces: `<container> <mac> <cidr>...`.
    Ps { containers: Vec<String> },
    /// Attach a running container to the weave network: `weave attach [addr...] <container>`.
    Attach(AttachArgs),
    /// Remove addresses (all when none given) from a container: `weave detach [addr...] <container>`.
    Detach {
        /// Addresses, then the container.
        #[arg(required = true, num_args = 1..)]
        args: Vec<String>,
    },
    /// Give the host an address on the weave network: `weave expose <addr>...`.
    #[command(disable_help_flag = true)]
    Expose {
        #[arg(long, action = clap::ArgAction::Help)]
        help: Option<bool>,
        addrs: Vec<String>,
        /// Register this name for the host (needs weaveDNS, coming later).
        #[arg(short = 'h', long = "fqdn")]
        fqdn: Option<String>,
    },
    /// Remove host addresses added with expose: `weave hide <addr>...`.
    Hide { addrs: Vec<String> },
    /// `docker run -d` the arguments, then attach the container: `weave run [addr...] <docker run args>`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        args: Vec<String>,
    },
    /// Connect to more peers: `weave connect [--replace] <peer>...`.
    Connect {
        /// Replace the current peers instead of adding to them.
        #[arg(long)]
        replace: bool,
        peers: Vec<String>,
    },
    /// Stop reconnecting to peers (existing connections stay): `weave forget <peer>...`.
    Forget {
        #[arg(required = true)]
        peers: Vec<String>,
    },
    /// Print the version of this client and of the running router.
    Version,
    /// Wait until this peer has joined the IP allocation ring (starting consensus if needed).
    Prime,
    /// Take over the address ranges of peers that are gone for good: `weave rmpeer <peer>...`
    /// (peer name or nickname). Never run it for the same peer on two hosts.
    Rmpeer {
        #[arg(required = true)]
        peers: Vec<String>,
    },
    /// Run the router daemon in the foreground (what the `weave` container runs).
    #[command(hide = true)]
    Router(RouterArgs),
    /// Run the Docker API proxy daemon in the foreground (what `weaveproxy` runs).
    #[command(hide = true)]
    Proxy(ProxyArgs),
}

#[derive(Debug, Args)]
pub struct LaunchArgs {
    /// Encrypt traffic between peers with this password.
    #[arg(long, env = "WEAVE_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// MTU of the weave bridge and container interfaces.
    #[arg(long, env = "WEAVE_MTU", default_value_t = 1376)]
    pub mtu: u32,
    /// Do not restart the router and proxy containers when they exit or at boot.
    #[arg(long)]
    pub no_restart: bool,
    /// This host's nickname (default: the hostname).
    #[arg(long)]
    pub nickname: Option<String>,
    /// Do not start the Docker API proxy.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    pub proxy: bool,
    /// Extra unix socket paths for the proxy (symlinked to /var/run/weave/weave.sock).
    #[arg(short = 'H')]
    pub listen: Vec<String>,
    /// Only connect to the peers given, not to those learnt through gossip.
    #[arg(long)]
    pub no_discovery: bool,
    /// Cap on mesh connections (0 = unlimited; default 200).
    #[arg(long)]
    pub conn_limit: Option<usize>,
    /// Peers in these subnets (a/b,c/d) that trust us too get unencrypted UDP (TCP stays
    /// encrypted).
    #[arg(long, value_parser = parse_subnets)]
    pub trusted_subnets: Option<Subnets>,
    #[command(flatten)]
    pub ipam: IpamArgs,
    #[command(flatten)]
    pub proxy_opts: ProxyOptions,
    /// Peers to connect to (`host[:port]`).
    pub peers: Vec<String>,
}

/// IP address allocation flags, shared by `weave launch` and the router daemon.
#[derive(Debug, Clone, Default, Args)]
pub struct IpamArgs {
    /// Addresses IPAM hands out, on every host alike (launch default 10.32.0.0/12; "" turns
    /// IPAM off).
    #[arg(long, visible_alias = "iprange")]
    pub ipalloc_range: Option<String>,
    /// Subnet for containers that ask for no particular one (default: the whole range).
    #[arg(long)]
    pub ipalloc_default_subnet: Option<String>,
    /// How the ring is created: consensus[=N] (default, N = peers given + 1), seed=<name>,...,
    /// or observer.
    #[arg(long)]
    pub ipalloc_init: Option<String>,
}

/// `--trusted-subnets a/b,c/d`, validated and normalised to networks (`10.1.2.3/8` →
/// `10.0.0.0/8`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subnets(pub Vec<Ipv4Cidr>);

impl std::fmt::Display for Subnets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let items: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&items.join(","))
    }
}

fn parse_subnets(s: &str) -> Result<Subnets, AddrError> {
    parse_cidr_list(s).map(Subnets)
}

/// Proxy behaviour flags shared by `weave launch` and the proxy daemon.
#[derive(Debug, Clone, Args)]
pub struct ProxyOptions {
    /// Take the container hostname from this label.
    #[arg(long)]
    pub hostname_from_label: Option<String>,
    /// Regex applied to the container name to derive its hostname.
    #[arg(long, default_value = "(.*)")]
    pub hostname_match: String,
    /// Replacement for --hostname-match ($1, ${name}).
    #[arg(long, default_value = "$1")]
    pub hostname_replacement: String,
    /// Show the weave address in `docker inspect`.
    #[arg(long)]
    pub rewrite_inspect: bool,
    /// Leave containers without WEAVE_CIDR alone.
    #[arg(long)]
    pub no_default_ipalloc: bool,
    /// Do not add the 224.0.0.0/4 route on ethwe.
    #[arg(long)]
    pub no_multicast_route: bool,
    /// Do not set hostname/DNS options of containers.
    #[arg(long)]
    pub without_dns: bool,
    /// Leave TX checksum offload on (only for fast datapaths).
    #[arg(long, hide = true)]
    pub keep_tx_on: bool,
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    /// Do not register the container in weaveDNS.
    #[arg(long)]
    pub without_dns: bool,
    /// Do not add the 224.0.0.0/4 route on ethwe.
    #[arg(long)]
    pub no_multicast_route: bool,
    /// Rewrite /etc/hosts (accepted for compatibility; comes with weaveDNS).
    #[arg(long)]
    pub rewrite_hosts: bool,
    /// Addresses, then the container.
    #[arg(required = true, num_args = 1..)]
    pub args: Vec<String>,
}

#[derive(Debug, Args)]
pub struct RouterArgs {
    #[arg(long, default_value = "weave")]
    pub bridge: String,
    /// dockerd, asked which containers exist before one is attached; its socket's group may
    /// use the router's API socket.
    #[arg(long, default_value = crate::docker::DEFAULT_DOCKER_HOST)]
    pub docker_api: String,
    #[arg(long, default_value_t = 1376)]
    pub mtu: u32,
    #[arg(long)]
    pub nickname: Option<String>,
    /// Proxy addresses to report on /proxyaddrs (repeatable).
    #[arg(long = "proxy-addr")]
    pub proxy_addrs: Vec<String>,
    /// Mesh port.
    #[arg(long, default_value_t = weave_router::MESH_PORT)]
    pub port: u16,
    /// Only connect to the peers given, not to those learnt through gossip.
    #[arg(long)]
    pub no_discovery: bool,
    /// Cap on mesh connections (0 = unlimited).
    #[arg(long, default_value_t = weave_router::DEFAULT_CONN_LIMIT)]
    pub conn_limit: usize,
    /// Peers in these subnets (a/b,c/d) that trust us too get unencrypted UDP.
    #[arg(long, value_parser = parse_subnets)]
    pub trusted_subnets: Option<Subnets>,
    /// IPAM (off unless --ipalloc-range is given; `weave launch` always gives one).
    #[command(flatten)]
    pub ipam: IpamArgs,
    /// Where IPAM keeps its state across restarts.
    #[arg(long, default_value = weave_router::ipam_shell::STATE_FILE, hide = true)]
    pub ipam_state: PathBuf,
    pub peers: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// Upstream dockerd.
    #[arg(long, default_value = "unix:///var/run/docker.sock")]
    pub docker_api: String,
    #[arg(long, default_value = DEFAULT_PROXY_SOCKET)]
    pub socket: PathBuf,
    /// Where the weavewait entrypoint binaries live on the host.
    #[arg(long, default_value = "/var/lib/weave/weavewait")]
    pub weavewait_dir: PathBuf,
    #[arg(long, default_value = "weave.local.")]
    pub dns_domain: String,
    #[command(flatten)]
    pub opts: ProxyOptions,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_user_forms() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).map(|c| c.command);
        assert!(matches!(
            parse(&["weave", "launch", "--password", "s3cret", "192.0.2.11"]),
            Ok(Command::Launch(LaunchArgs { password: Some(_), ref peers, .. })) if peers == &["192.0.2.11"]
        ));
        assert!(matches!(
            parse(&["weave", "connect", "--replace", "a", "b:6783"]),
            Ok(Command::Connect { replace: true, ref peers }) if peers == &["a", "b:6783"]
        ));
        assert!(matches!(
            parse(&["weave", "forget", "a"]),
            Ok(Command::Forget { ref peers }) if peers == &["a"]
        ));
        assert!(parse(&["weave", "forget"]).is_err());
        assert!(matches!(
            parse(&["weave", "router", "--no-discovery", "--conn-limit", "5", "h1"]),
            Ok(Command::Router(RouterArgs { no_discovery: true, conn_limit: 5, port: 6783, ref peers, .. })) if peers == &["h1"]
        ));
        let launch = parse(&[
            "weave",
            "launch",
            "--no-discovery",
            "--conn-limit",
            "7",
            "--trusted-subnets",
            "10.1.2.3/8,192.168.0.0/16",
            "h1",
        ]);
        match launch {
            Ok(Command::Launch(a)) => {
                assert!(a.no_discovery);
                assert_eq!(a.conn_limit, Some(7));
                assert_eq!(
                    a.trusted_subnets.map(|s| s.to_string()).as_deref(),
                    Some("10.0.0.0/8,192.168.0.0/16")
                );
                assert_eq!(a.peers, ["h1"]);
            }
            other => panic!("launch with mesh flags: {other:?}"),
        }
        let bad = parse(&["weave", "launch", "--trusted-subnets", "10.0.0.0/8,nope"])
            .expect_err("bad CIDR");
        assert!(bad.to_string().contains("invalid CIDR \"nope\""), "{bad}");
        assert!(matches!(
            parse(&["weave", "router", "--trusted-subnets=192.0.2.0/24"]),
            Ok(Command::Router(RouterArgs { trusted_subnets: Some(ref s), .. })) if s.to_string() == "192.0.2.0/24"
        ));
        assert!(matches!(
            parse(&["weave", "launch", "--proxy=false"]),
            Ok(Command::Launch(LaunchArgs { proxy: false, .. }))
        ));
        assert!(matches!(
            parse(&["weave", "attach", "10.2.1.1/24", "10.2.2.1/24", "c1"]),
            Ok(Command::Attach(AttachArgs { ref args, .. })) if args.len() == 3
        ));
        assert!(matches!(
            parse(&["weave", "run", "10.2.1.1/24", "-d", "--name", "x", "busybox", "sleep", "9"]),
            Ok(Command::Run { ref args }) if args.len() == 7
        ));
        assert!(matches!(
            parse(&["weave", "env", "--restore"]),
            Ok(Command::Env { restore: true })
        ));
        assert!(parse(&["weave", "attach"]).is_err());
        assert!(matches!(parse(&["weave", "prime"]), Ok(Command::Prime)));
        assert!(matches!(
            parse(&["weave", "rmpeer", "host2", "aa:bb:cc:dd:ee:ff"]),
            Ok(Command::Rmpeer { ref peers }) if peers.len() == 2
        ));
        assert!(parse(&["weave", "rmpeer"]).is_err());
        match parse(&[
            "weave",
            "launch",
            "--iprange",
            "172.30.0.0/16",
            "--ipalloc-init=seed=::1,::2",
            "h1",
        ]) {
            Ok(Command::Launch(a)) => {
                assert_eq!(a.ipam.ipalloc_range.as_deref(), Some("172.30.0.0/16"));
                assert_eq!(a.ipam.ipalloc_init.as_deref(), Some("seed=::1,::2"));
                assert_eq!(a.peers, ["h1"]);
            }
            other => panic!("launch with IPAM flags: {other:?}"),
        }
        assert!(matches!(
            parse(&["weave", "launch", "--ipalloc-range", ""]),
            Ok(Command::Launch(LaunchArgs { ipam: IpamArgs { ipalloc_range: Some(ref r), .. }, .. })) if r.is_empty()
        ));
        assert!(parse(&["weave", "frobnicate"]).is_err());
    }
}
