//! Allocation latency of the IPAM core (no IO): p50/p99 of `allocate` plus draining its outputs
//! (the reply and the state to persist), on a ring of 4 seeded peers, then with space that has
//! to be donated by another peer first (two allocators wired in memory: request, grant, ring
//! merge). `cargo bench -p weave-router --bench ipam`.

use std::time::{Duration, Instant};

use weave_router::addr::Ipv4Cidr;
use weave_router::ipam::{Allocator, Config, InitMode, Output, Reply, RequestId};
use weave_router::mesh::app::{AppEvent, AppSend, GossipKind, PeerInfo};
use weave_router::mesh::peer::PeerName;
use weave_router::mesh::sim::SimRng;

fn cidr(s: &str) -> Ipv4Cidr {
    s.parse().expect("CIDR literal")
}

fn allocator(me: u64, universe: &str, seeds: &[u64], now: Instant) -> Allocator {
    let config = Config {
        universe: cidr(universe),
        default_subnet: cidr(universe),
        init: InitMode::Seed(seeds.iter().map(|&n| PeerName::from_u64(n)).collect()),
        request_timeout: Duration::from_secs(30),
    };
    Allocator::new(
        config,
        PeerName::from_u64(me),
        format!("host{me}"),
        me,
        None,
        Box::new(SimRng::new(me)),
        now,
    )
}

fn percentiles(mut ns: Vec<u64>) -> (u64, u64, u64) {
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() as f64 * q) as usize).min(ns.len() - 1)];
    (at(0.5), at(0.99), ns[ns.len() - 1])
}

/// `live` containers on one host: each new one allocated, the oldest deleted (steady state).
fn own_space(live: usize, rounds: usize) -> (u64, u64, u64) {
    let now = Instant::now();
    let mut a = allocator(1, "10.32.0.0/12", &[1, 2, 3, 4], now);
    while a.poll_output().is_some() {}
    let mut ns = Vec::with_capacity(rounds);
    for i in 0..live + rounds {
        if i >= live {
            a.delete(now, &format!("{:064x}", i - live))
                .expect("allocated before");
            // The shell drains (and drops) the outputs after every call.
            while a.poll_output().is_some() {}
        }
        let t = Instant::now();
        a.allocate(now, RequestId(i as u64), &format!("{i:064x}"), None);
        let mut got = false;
        while let Some(o) = a.poll_output() {
            got |= matches!(
                o,
                Output::Reply {
                    result: Ok(Reply::Addr(_)),
                    ..
                }
            );
        }
        let el = t.elapsed().as_nanos() as u64;
        assert!(got, "allocation {i} answered");
        if i >= live {
            ns.push(el);
        }
    }
    percentiles(ns)
}

/// What building the state to persist costs alone (the whole owned map, every change), p50.
fn persist_only(live: usize) -> u64 {
    let now = Instant::now();
    let mut a = allocator(1, "10.32.0.0/12", &[1, 2, 3, 4], now);
    for i in 0..live {
        a.allocate(now, RequestId(i as u64), &format!("{i:064x}"), None);
    }
    while a.poll_output().is_some() {}
    let mut ns: Vec<u64> = (0..200)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(a.persisted());
            t.elapsed().as_nanos() as u64
        })
        .collect();
    ns.sort_unstable();
    ns[ns.len() / 2]
}

/// Outputs of `from` as events for `to` (unicast and broadcast alike); replies counted.
fn carry(from: &mut Allocator, from_name: PeerName, to: &mut Allocator, now: Instant) -> usize {
    let mut replies = 0;
    let mut msgs = Vec::new();
    while let Some(o) = from.poll_output() {
        match o {
            Output::Send(AppSend::Unicast { payload, .. }) => {
                msgs.push((GossipKind::Unicast, payload))
            }
            Output::Send(AppSend::Broadcast { payload }) => {
                msgs.push((GossipKind::Broadcast, payload))
            }
            Output::Send(AppSend::Neighbours { payload }) => {
                msgs.push((GossipKind::Neighbours, payload))
            }
            Output::Reply { .. } => replies += 1,
            Output::Persist(_) => {}
        }
    }
    for (kind, payload) in msgs {
        let ev = AppEvent::Gossip {
            kind,
            src: from_name,
            from: from_name,
            payload,
        };
        to.on_event(now, ev).expect("valid message");
    }
    replies
}

/// A peer with no space of its own: its first allocation waits for a donation. Time from the
/// request to its reply, the messages (space request, grant, ring) carried in memory.
fn donated(rounds: usize) -> (u64, u64, u64) {
    let (n1, n2) = (PeerName::from_u64(1), PeerName::from_u64(2));
    let peers = AppEvent::Peers(
        [n1, n2]
            .iter()
            .map(|&name| PeerInfo {
                name,
                nickname: format!("host{}", name.as_u64()),
                reachable: true,
            })
            .collect(),
    );
    let mut ns = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let now = Instant::now();
        // Peer 2 owns the whole range; peer 1 (same seeds, so the same ring) owns nothing.
        let mut a = allocator(1, "10.32.0.0/12", &[2], now);
        let mut b = allocator(2, "10.32.0.0/12", &[2], now);
        a.on_event(now, peers.clone()).expect("peers");
        b.on_event(now, peers.clone()).expect("peers");
        carry(&mut a, n1, &mut b, now);
        carry(&mut b, n2, &mut a, now);
        while a.poll_output().is_some() {}
        while b.poll_output().is_some() {}
        let t = Instant::now();
        a.allocate(now, RequestId(i as u64), "c1", None);
        let mut answered = carry(&mut a, n1, &mut b, now);
        answered += carry(&mut b, n2, &mut a, now);
        answered += carry(&mut a, n1, &mut b, now);
        ns.push(t.elapsed().as_nanos() as u64);
        assert_eq!(answered, 1, "allocation {i} answered after one donation");
    }
    percentiles(ns)
}

fn main() {
    for live in [100, 1000, 10_000] {
        let (p50, p99, max) = own_space(live, 5000);
        println!(
            "allocate from own space, {live:>6} containers live: p50 {:>7.1} µs  p99 {:>7.1} µs  max {:>8.1} µs  (of which building the state to persist: p50 {:>7.1} µs)",
            p50 as f64 / 1e3,
            p99 as f64 / 1e3,
            max as f64 / 1e3,
            persist_only(live) as f64 / 1e3
        );
    }
    let (p50, p99, max) = donated(2000);
    println!(
        "allocate needing a donation (in-memory round trip): p50 {:>7.1} µs  p99 {:>7.1} µs  max {:>8.1} µs",
        p50 as f64 / 1e3,
        p99 as f64 / 1e3,
        max as f64 / 1e3
    );
}
