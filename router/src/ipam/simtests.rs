//! IPAM on the simulated mesh ([`SimNet`]): real nodes, gossip, latency, partitions.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use super::app::SharedIpam;
use super::tests::{cidr, config, TestRng};
use super::*;
use crate::mesh::sim::{SimConfig, SimNet};

const LIMIT: Duration = Duration::from_secs(60);
const STEP: Duration = Duration::from_millis(10);

/// `n` fully meshed nodes, each with an allocator made by `init`, topology converged.
fn cluster(
    n: usize,
    seed: u64,
    init: impl Fn(&SimNet) -> InitMode,
    universe: &str,
) -> (SimNet, Vec<SharedIpam>) {
    let mut net = SimNet::new(
        n,
        SimConfig {
            seed,
            ..SimConfig::default()
        },
    );
    let mut apps = Vec::new();
    for i in 0..n {
        net.set_peers(i, (0..i).collect());
        let a = Allocator::new(
            config(universe, init(&net)),
            net.name(i),
            format!("sim{i}"),
            seed * 100 + i as u64,
            None,
            Box::new(TestRng(seed * 1000 + i as u64)),
            net.now(),
        );
        let app: SharedIpam = Rc::new(RefCell::new(IpamApp::new(a)));
        net.add_app(i, Box::new(app.clone()));
        apps.push(app);
    }
    net.start_all();
    assert!(
        net.run_until_cond(LIMIT, STEP, SimNet::converged),
        "topology"
    );
    (net, apps)
}

fn allocate(net: &mut SimNet, apps: &[SharedIpam], i: usize, id: u64, ident: &str) {
    let now = net.now();
    {
        let mut app = apps[i].borrow_mut();
        app.allocator.allocate(now, RequestId(id), ident, None);
        app.drain();
    }
    net.touch(i);
}

fn take_replies(apps: &[SharedIpam]) -> Vec<(usize, RequestId, Result<Reply, IpamError>)> {
    let mut out = Vec::new();
    for (i, a) in apps.iter().enumerate() {
        out.extend(a.borrow_mut().replies.drain(..).map(|(id, r)| (i, id, r)));
    }
    out
}

#[test]
fn three_peers_reach_consensus_on_the_simulated_mesh() {
    let (mut net, apps) = cluster(3, 7, |_| InitMode::Consensus { quorum: 2 }, "10.32.0.0/12");
    // Connected for a while: nobody starts consensus by itself.
    net.run_for(Duration::from_secs(40));
    assert!(apps.iter().all(|a| a.borrow().allocator.ring().is_empty()));
    let t0 = net.elapsed();
    allocate(&mut net, &apps, 2, 1, "c1");
    let all_have_ring = |_: &SimNet| apps.iter().all(|a| !a.borrow().allocator.ring().is_empty());
    assert!(net.run_until_cond(LIMIT, Duration::from_millis(1), all_have_ring));
    let took = net.elapsed() - t0;
    eprintln!("IPAM consensus with 3 peers (5 ms links): {took:?} of virtual time");
    assert!(took < Duration::from_millis(100), "{took:?}");
    net.run_for(Duration::from_secs(1));
    let replies = take_replies(&apps);
    assert!(
        matches!(replies.as_slice(), [(2, RequestId(1), Ok(Reply::Addr(_)))]),
        "{replies:?}"
    );
    let seeds = apps[0].borrow().allocator.ring().seeds.clone();
    // Idle electors gossip their claims: the proposer gives every one of them a share.
    assert_eq!(seeds.len(), 3, "{seeds:?}");
    for a in &apps {
        let a = a.borrow();
        assert_eq!(a.allocator.ring().seeds, seeds);
        a.allocator.check().unwrap();
        assert_eq!(a.allocator.status().status, "ready");
    }
}

#[test]
fn allocations_across_a_partition_never_collide() {
    partition_scenario(11, 0.0);
}

/// The same over many seeds, with 2% of the mesh's messages lost.
#[test]
fn allocations_across_a_partition_with_loss_never_collide() {
    for seed in 100..120 {
        partition_scenario(seed, 0.02);
    }
}

fn partition_scenario(seed: u64, loss: f64) {
    let n = 4;
    let (mut net, apps) = cluster(
        n,
        seed,
        |net| InitMode::Seed((0..n).map(|i| net.name(i)).collect()),
        "10.9.0.0/24",
    );
    net.set_loss(loss);
    let mut id = 0;
    let mut want = BTreeMap::new();
    let mut burst = |net: &mut SimNet, round: &str, nodes: &[usize], per_node: usize| {
        for &i in nodes {
            for k in 0..per_node {
                id += 1;
                let ident = format!("{round}-{i}-{k}");
                allocate(net, &apps, i, id, &ident);
                want.insert(RequestId(id), (i, ident));
            }
        }
    };
    burst(&mut net, "a", &[0, 1, 2, 3], 10);
    net.run_for(Duration::from_secs(2));
    net.partition(&[0, 1], &[2, 3]);
    net.run_for(Duration::from_secs(5));
    // Beyond a node's own 64: each side's donor gives space to the other node of its side.
    burst(&mut net, "b", &[0, 2], 80);
    net.run_for(Duration::from_secs(10));
    net.heal();
    burst(&mut net, "c", &[0, 1, 2, 3], 5);
    net.run_for(Duration::from_secs(60));
    net.set_loss(0.0);
    net.run_for(Duration::from_secs(60));
    let replies = take_replies(&apps);
    let mut seen: BTreeMap<std::net::Ipv4Addr, RequestId> = BTreeMap::new();
    let universe = cidr("10.9.0.0/24");
    for (i, id, r) in &replies {
        let Ok(Reply::Addr(c)) = r else {
            panic!("seed {seed}: node {i} request {id:?}: {r:?}");
        };
        assert!(universe.contains(c.addr));
        assert_eq!(want.get(id).map(|w| w.0), Some(*i));
        if let Some(other) = seen.insert(c.addr, *id) {
            panic!("seed {seed}: {} given to {other:?} and {id:?}", c.addr);
        }
    }
    assert_eq!(
        replies.len(),
        want.len(),
        "seed {seed}: every request answered"
    );
    // Donations did happen: node 0 holds addresses from node 1's original quarter.
    let ring = apps[0].borrow().allocator.ring().clone();
    assert!(ring.entries.len() > n, "{ring:?}");
    let entries = |i: usize| -> Vec<(u64, crate::mesh::peer::PeerName)> {
        apps[i]
            .borrow()
            .allocator
            .ring()
            .entries
            .iter()
            .map(|e| (e.token, e.peer))
            .collect()
    };
    for (i, a) in apps.iter().enumerate() {
        a.borrow().allocator.check().unwrap();
        assert_eq!(
            entries(i),
            entries(0),
            "seed {seed}: node {i} agrees on the owners"
        );
    }
}
