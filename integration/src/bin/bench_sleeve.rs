//! Benchmark (not a test): container-to-container throughput (iperf3 TCP) and ping RTT between
//! two simulated hosts, all measured in the same run:
//!
//! - the underlay itself (the ceiling: iperf3 between the hosts over their own veth link);
//! - kernel VXLAN on the weave bridges (the fastdp analogue): `weave launch` with no peers on
//!   each host, so weave's own sleeve carries nothing, and a kernel VXLAN device `vxlan-bench`
//!   (VNI 42, UDP 4789, unicast to the other host over the underlay) added as a port of each
//!   host's `weave` bridge, with the bridge's (overlay) MTU as fastdp gives its datapath;
//!   bridged frames pass dockerd's FORWARD DROP (br_netfilter) by weave's
//!   `-i weave -o weave ACCEPT`;
//! - weave's sleeve, unencrypted and encrypted (`weave launch` peering the two hosts).
//!
//! The containers, their addresses and the proxy that attaches them are the same in every weave
//! row. Weave turns TX checksum offload off on the containers' interfaces, which also drops
//! TSO, so in the overlay rows TCP segments at the MSS in the sender, while the ceiling row's
//! veth carries large TSO/GSO segments. Each row prints its figures with ratios to the ceiling
//! and to kernel VXLAN.
//!
//! Run as root: `WEAVE_BIN=target/release/weave target/release/bench-sleeve [seconds]`.
//! iperf3 runs from the host's packages inside each container's network namespace.

use anyhow::{anyhow, Context, Result};
use weave_integration::weave::{launch, launch_pair, underlay};
use weave_integration::{eventually, patience, Cluster, Host, UNDERLAY_IFACE};

/// The weave bridge, as `weave launch` names it.
const WEAVE_BRIDGE: &str = "weave";
/// The kernel VXLAN device the bench adds to each host's weave bridge.
const VXLAN_DEV: &str = "vxlan-bench";
const VXLAN_VNI: &str = "42";
/// The IANA VXLAN port (weave's fastdp uses 6784; any free port does here).
const VXLAN_PORT: &str = "4789";

struct Figures {
    gbits: f64,
    rtt_ms: f64,
}

/// iperf3 from `client_ns` (a pid whose netns to use, or None for the host's own) on `client`
/// to `server_ip`, where a one-shot server runs in `server_ns` on `server`.
fn measure(
    server: &Host,
    server_ns: Option<&str>,
    client: &Host,
    client_ns: Option<&str>,
    server_ip: &str,
    seconds: u32,
) -> Result<Figures> {
    let in_ns = |ns: Option<&str>, cmd: &[&str]| -> Vec<String> {
        let mut argv: Vec<String> = Vec::new();
        if let Some(pid) = ns {
            argv.extend(["nsenter", "-t", pid, "-n"].map(String::from));
        }
        argv.extend(cmd.iter().map(|s| s.to_string()));
        argv
    };
    let server_argv = in_ns(server_ns, &["iperf3", "-s", "-1", "--forceflush"]);
    let mut iperf_server = server
        .cmd(&server_argv[0])
        .args(&server_argv[1..])
        .spawn()?;
    iperf_server.wait_for_stdout("Server listening")?;
    let secs = seconds.to_string();
    let client_argv = in_ns(client_ns, &["iperf3", "-c", server_ip, "-t", &secs, "-J"]);
    let out = client.run(&client_argv[0], &client_argv[1..])?.ok()?;
    let report: serde_json::Value =
        serde_json::from_str(&out.stdout).context("iperf3 -J output")?;
    let bits = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow!("no throughput in iperf3's report"))?;
    drop(iperf_server);
    let ping_argv = in_ns(
        client_ns,
        &["ping", "-c", "20", "-i", "0.05", "-q", server_ip],
    );
    let ping = client.run(&ping_argv[0], &ping_argv[1..])?.ok()?;
    // "rtt min/avg/max/mdev = 0.045/0.061/0.090/0.010 ms"
    let rtt_ms = ping
        .stdout
        .lines()
        .find_map(|l| l.split_once(" = ").map(|(_, v)| v.to_string()))
        .and_then(|v| v.split('/').nth(1).and_then(|avg| avg.parse().ok()))
        .ok_or_else(|| anyhow!("no RTT in ping's summary: {ping}"))?;
    Ok(Figures {
        gbits: bits / 1e9,
        rtt_ms,
    })
}

fn container_pid(h: &Host, name: &str) -> Result<String> {
    Ok(h.docker(["inspect", "-f", "{{.State.Pid}}", name])?
        .ok()?
        .stdout_trim()
        .to_string())
}

/// Starts `srv` on `h1` (10.35.1.1/24) and `cli` on `h2` (10.35.1.2/24) through the weave
/// proxy, waits until they ping each other, and returns the figures between them.
fn container_figures(h1: &Host, h2: &Host, seconds: u32) -> Result<Figures> {
    for (h, name, cidr) in [(h1, "srv", "10.35.1.1/24"), (h2, "cli", "10.35.1.2/24")] {
        let env = format!("WEAVE_CIDR={cidr}");
        h.docker_proxy([
            "run", "-d", "--name", name, "-e", &env, "busybox", "sleep", "100000",
        ])?
        .ok()?;
    }
    eventually("the containers reach each other", patience(), || {
        h2.docker(["exec", "cli", "ping", "-c1", "-W1", "10.35.1.1"])?
            .ok()
    })?;
    let (srv, cli) = (container_pid(h1, "srv")?, container_pid(h2, "cli")?);
    measure(h1, Some(&srv), h2, Some(&cli), "10.35.1.1", seconds)
}

/// Weave's sleeve: weave on both hosts, peered (with or without a password).
fn weave_figures(password: Option<&str>, seconds: u32) -> Result<Figures> {
    let cluster = Cluster::new(2)?;
    let (h1, h2) = (cluster.host(0), cluster.host(1));
    launch_pair(h1, h2, password)?;
    container_figures(h1, h2, seconds)
}

/// Adds [`VXLAN_DEV`] to `h`'s weave bridge, tunnelling to `remote` over the underlay, with the
/// bridge's MTU (the overlay MTU, as fastdp sets on its datapath; the 50 bytes of VXLAN
/// encapsulation still fit the underlay's 1500).
fn add_vxlan(h: &Host, remote: &str) -> Result<()> {
    let mtu = h
        .run("cat", [format!("/sys/class/net/{WEAVE_BRIDGE}/mtu")])?
        .ok()?
        .stdout_trim()
        .to_string();
    let add = format!(
        "link add {VXLAN_DEV} type vxlan id {VXLAN_VNI} remote {remote} dstport {VXLAN_PORT} \
         dev {UNDERLAY_IFACE}"
    );
    for args in [
        add.split_whitespace().collect(),
        vec!["link", "set", VXLAN_DEV, "mtu", &mtu],
        vec!["link", "set", VXLAN_DEV, "master", WEAVE_BRIDGE, "up"],
    ] {
        h.run("ip", &args)?.ok()?;
    }
    Ok(())
}

/// Kernel VXLAN (the fastdp analogue): weave on both hosts without peers (its bridge, proxy
/// and iptables rules, but no sleeve traffic), the weave bridges joined by [`VXLAN_DEV`].
fn vxlan_figures(seconds: u32) -> Result<Figures> {
    let cluster = Cluster::new(2)?;
    let (h1, h2) = (cluster.host(0), cluster.host(1));
    let (a1, a2) = (underlay(h1)?, underlay(h2)?);
    for (h, remote) in [(h1, &a2), (h2, &a1)] {
        launch(h, &[])?;
        add_vxlan(h, remote)?;
    }
    container_figures(h1, h2, seconds)
}

fn main() -> Result<()> {
    let seconds: u32 = match std::env::args().nth(1) {
        Some(s) => s
            .parse()
            .context("the argument is the seconds per iperf3 run")?,
        None => 5,
    };
    let ceiling = {
        let cluster = Cluster::new(2)?;
        let (h1, h2) = (cluster.host(0), cluster.host(1));
        let a1 = underlay(h1)?;
        measure(h1, None, h2, None, &a1, seconds)?
    };
    let vxlan = vxlan_figures(seconds)?;
    let plain = weave_figures(None, seconds)?;
    let encrypted = weave_figures(Some("bench-password"), seconds)?;
    println!(
        "iperf3 TCP {seconds}s and ping RTT (avg of 20), container to container across two hosts"
    );
    for (label, f) in [
        ("underlay veth (ceiling)", &ceiling),
        ("kernel VXLAN (fastdp analogue)", &vxlan),
        ("weave sleeve, plain", &plain),
        ("weave sleeve, encrypted", &encrypted),
    ] {
        println!(
            "{label:>30}: {:>7.3} Gbit/s ({:>5.1}% of ceiling, {:>5.2}x VXLAN)  \
             RTT {:>6.3} ms ({:>5.2}x ceiling, {:>5.2}x VXLAN)",
            f.gbits,
            100.0 * f.gbits / ceiling.gbits,
            f.gbits / vxlan.gbits,
            f.rtt_ms,
            f.rtt_ms / ceiling.rtt_ms,
            f.rtt_ms / vxlan.rtt_ms,
        );
    }
    Ok(())
}
