//! IPAM messages: decoding arbitrary bytes, re-encoding, and feeding them to an allocator.
//!
//! Invariants: what decodes re-encodes to bytes that decode to the same message; an allocator
//! holding a ring and allocations, fed the message as gossip (any kind) from another peer,
//! never panics, and afterwards its ring invariants hold and its space still covers exactly
//! what its ring says it owns, with every recorded address taken.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use weave_router::addr::Ipv4Cidr;
use weave_router::ipam::codec::Message;
use weave_router::ipam::{Allocator, Config, InitMode, RequestId};
use weave_router::mesh::app::{AppEvent, GossipKind};
use weave_router::mesh::peer::PeerName;

#[path = "fuzz_rng.rs"]
mod fuzz_rng;
use fuzz_rng::FuzzRng;

fn cidr(s: &str) -> Ipv4Cidr {
    s.parse().expect("a valid CIDR literal")
}

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = Message::decode(data) else {
        return feed(data);
    };
    let again = msg.encode();
    assert_eq!(Message::decode(&again).as_ref(), Ok(&msg));
    feed(data);
});

fn feed(data: &[u8]) {
    let now = Instant::now();
    let (me, other) = (PeerName::from_u64(1), PeerName::from_u64(2));
    let config = Config {
        universe: cidr("10.32.0.0/12"),
        default_subnet: cidr("10.32.0.0/12"),
        init: InitMode::Seed(vec![me, other]),
        request_timeout: Duration::from_secs(30),
    };
    let seed = data.iter().fold(0u64, |h, b| h.rotate_left(5) ^ u64::from(*b));
    let mut a = Allocator::new(config, me, "me".into(), 7, None, Box::new(FuzzRng(seed)), now);
    for i in 0..3 {
        a.allocate(now, RequestId(i), &format!("c{i}"), None);
    }
    a.claim(now, RequestId(9), "c9", cidr("10.40.0.9/12"), false);
    let kind = match data.last().map(|b| b % 3) {
        Some(0) => GossipKind::Unicast,
        Some(1) => GossipKind::Broadcast,
        _ => GossipKind::Neighbours,
    };
    let event = AppEvent::Gossip {
        kind,
        src: other,
        from: other,
        payload: data.to_vec(),
    };
    let _ = a.on_event(now, event);
    a.handle_timeout(now + Duration::from_secs(31));
    while a.poll_output().is_some() {}
    if let Err(e) = a.check() {
        panic!("allocator inconsistent after a message: {e}");
    }
}
