//! The mesh at scale, on the simulated network (`mesh::sim`), in virtual time:
//! `cargo bench -p weave-router --bench mesh_sim`. Prints curves, asserts nothing timed.
//!
//! 1. Full restart: N nodes start at once, each launched with 3 random others as peers
//!    (discovery on, the default connection limit). Virtual time until every node has the same
//!    topology and reaches every other (first agreement), and until it stops changing.
//! 2. The gossip bytes one change costs once the mesh is quiet: a new connection, and a node
//!    restart. Measured against a twin run from the same seed without the change, so periodic
//!    gossip cancels out. Bytes per peer should stay roughly flat as N grows (linear total).

use std::time::{Duration, Instant};

use weave_router::mesh::gossip::GossipData;
use weave_router::mesh::sim::{SimConfig, SimNet, SimRng};
use weave_router::DEFAULT_CONN_LIMIT;

const SIZES: [usize; 3] = [10, 50, 200];

/// `MESH_SIM_SIZES=10,50` to run fewer.
fn sizes() -> Vec<usize> {
    std::env::var("MESH_SIM_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| SIZES.to_vec())
}
const STEP: Duration = Duration::from_millis(50);

fn build(n: usize, seed: u64, discovery: bool) -> SimNet {
    let mut net = SimNet::new(
        n,
        SimConfig {
            seed,
            latency: Duration::from_millis(2),
            loss: 0.0,
            conn_limit: DEFAULT_CONN_LIMIT,
            discovery,
        },
    );
    let mut rng = SimRng::new(seed ^ 0x5eed);
    for i in 0..n {
        let mut peers = Vec::new();
        while peers.len() < 3.min(n - 1) {
            let j = rng.below(n as u64) as usize;
            if j != i && !peers.contains(&j) {
                peers.push(j);
            }
        }
        net.set_peers(i, peers);
    }
    net
}

/// (first agreement, last change) in virtual time, over `horizon`.
fn restart(n: usize, horizon: Duration) -> (Option<Duration>, Option<Duration>, SimNet) {
    let mut net = build(n, 42, true);
    net.start_all();
    let mut first = None;
    let mut settled = None;
    let mut was = false;
    let mut shape = (0, 0);
    while net.elapsed() < horizon {
        net.run_for(STEP);
        let now = net.converged();
        let s = (net.connection_count(), topology_size(&net));
        if now && first.is_none() {
            first = Some(net.elapsed());
        }
        if now && (!was || s != shape) {
            settled = Some(net.elapsed());
        }
        if !now {
            settled = None;
        }
        was = now;
        shape = s;
    }
    (first, settled, net)
}

fn topology_size(net: &SimNet) -> usize {
    net.node(0).map_or(0, |n| n.topology().full_state().len())
}

#[derive(Clone, Copy)]
enum Change {
    NewConnection,
    Restart,
}

/// Gossip bytes the change costs: (topology bytes with it - without it) over `window`, and the
/// virtual time until the mesh agrees again.
fn change_cost(n: usize, discovery: bool, change: Change) -> (i64, Option<Duration>) {
    let warmup = Duration::from_secs(40);
    let window = Duration::from_secs(20);
    let run = |apply: bool| {
        let mut net = build(n, 7, discovery);
        net.start_all();
        net.run_for(warmup);
        let before = topo_bytes(&net);
        let mut reconverged = None;
        if apply {
            match change {
                Change::NewConnection => {
                    // Two nodes not connected yet.
                    let pair = (0..n)
                        .flat_map(|i| (0..n).map(move |j| (i, j)))
                        .find(|&(i, j)| {
                            i != j
                                && net
                                    .node(i)
                                    .is_some_and(|a| !a.connections().contains_key(&net.name(j)))
                        });
                    if let Some((i, j)) = pair {
                        net.connect(i, j);
                    }
                }
                Change::Restart => net.start(n / 2, None),
            }
            let t0 = net.elapsed();
            net.run_for(STEP);
            if net.run_until_cond(window - STEP, STEP, SimNet::converged) {
                reconverged = Some(net.elapsed() - t0);
            }
        }
        let end = warmup + window;
        net.run_until(net.now() + end.saturating_sub(net.elapsed()));
        (topo_bytes(&net) - before, reconverged)
    };
    let (with, reconverged) = run(true);
    let (without, _) = run(false);
    (with as i64 - without as i64, reconverged)
}

fn topo_bytes(net: &SimNet) -> u64 {
    net.traffic()
        .by_channel
        .get("topology")
        .copied()
        .unwrap_or(0)
}

fn secs(d: Option<Duration>) -> String {
    d.map_or_else(
        || "never".to_string(),
        |d| format!("{:.2} s", d.as_secs_f64()),
    )
}

fn main() {
    let wall = Instant::now();
    println!("full restart (discovery on, conn limit {DEFAULT_CONN_LIMIT}, 3 launch peers each, 2 ms links):");
    println!(
        "{:>6} {:>16} {:>16} {:>8} {:>14}",
        "peers", "first agreement", "settled", "conns", "full state B"
    );
    for n in sizes() {
        let (first, settled, net) = restart(n, Duration::from_secs(30));
        println!(
            "{n:>6} {:>16} {:>16} {:>8} {:>14}",
            secs(first),
            secs(settled),
            net.connection_count(),
            topology_size(&net)
        );
    }
    for (discovery, what) in [
        (false, "discovery off: sparse mesh"),
        (true, "discovery on: full mesh"),
    ] {
        println!("gossip bytes of one change, {what} (twin runs, periodic gossip cancelled out):");
        println!(
            "{:>6} {:>16} {:>12} {:>10} {:>14}",
            "peers", "change", "bytes", "per peer", "reconverged"
        );
        for n in sizes() {
            for (change, name) in [
                (Change::NewConnection, "new connection"),
                (Change::Restart, "node restart"),
            ] {
                if discovery && matches!(change, Change::NewConnection) {
                    continue; // every pair is connected already
                }
                let (bytes, reconverged) = change_cost(n, discovery, change);
                println!(
                    "{n:>6} {name:>16} {bytes:>12} {:>10} {:>14}",
                    bytes / n as i64,
                    secs(reconverged)
                );
            }
        }
    }
    println!("(wall time {:.1} s)", wall.elapsed().as_secs_f64());
}
