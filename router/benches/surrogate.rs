//! Cost per message of the surrogate gossip filter with 2000 digests remembered, against the
//! previous design (which swept every digest on every message). Prints ns per message:
//! `cargo bench -p weave-router --bench surrogate`.

use std::collections::HashMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use weave_router::mesh::gossip::{gossip_digest, SurrogateFilter, GOSSIP_INTERVAL};

const ENTRIES: usize = 2000;
const ROUNDS: usize = 20_000;

/// The previous filter: `retain` over every digest per message (O(n)).
#[derive(Default)]
struct SweepingFilter {
    seen: HashMap<[u8; 32], Instant>,
}

impl SweepingFilter {
    fn should_relay(&mut self, now: Instant, channel: &str, payload: &[u8]) -> bool {
        self.seen
            .retain(|_, t| now.saturating_duration_since(*t) < GOSSIP_INTERVAL);
        let key = gossip_digest(channel, payload);
        if self.seen.contains_key(&key) {
            return false;
        }
        self.seen.insert(key, now);
        true
    }
}

fn payload(i: usize) -> [u8; 64] {
    let mut p = [0u8; 64];
    p[..8].copy_from_slice(&(i as u64).to_be_bytes());
    p
}

/// Fill with ENTRIES digests, then time ROUNDS messages that repeat them (the set stays at
/// ENTRIES): ns per message.
fn measure(mut relay: impl FnMut(Instant, &[u8]) -> bool) -> f64 {
    let t0 = Instant::now();
    for i in 0..ENTRIES {
        assert!(relay(t0, &payload(i)));
    }
    let now = t0 + Duration::from_secs(1);
    let start = Instant::now();
    for r in 0..ROUNDS {
        assert!(!black_box(relay(now, &payload(r % ENTRIES))));
    }
    start.elapsed().as_nanos() as f64 / ROUNDS as f64
}

fn main() {
    let mut new = SurrogateFilter::default();
    let mut old = SweepingFilter::default();
    // Warm up once, then report the better of three runs of each.
    let runs = |f: &mut dyn FnMut() -> f64| (0..3).map(|_| f()).fold(f64::MAX, f64::min);
    let new_ns = runs(&mut || {
        new = SurrogateFilter::default();
        measure(|t, p| new.should_relay(t, "IPallocation", p))
    });
    let old_ns = runs(&mut || {
        old = SweepingFilter::default();
        measure(|t, p| old.should_relay(t, "IPallocation", p))
    });
    println!("surrogate filter, {ENTRIES} digests, 64-byte payloads, per message:");
    println!("  sweeping (previous): {:>10.1} ns", old_ns);
    println!("  ordered expiry:      {:>10.1} ns", new_ns);
}
