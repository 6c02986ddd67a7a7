//! Topology gossip: decoding arbitrary payloads, merging them and re-encoding.
//!
//! Invariants: what decodes re-encodes to a payload that decodes; merging that re-encoding
//! into a fresh topology and encoding again gives the same bytes (encode and decode are
//! inverse up to the merge rules); the gossip channel's "improvement" always decodes and only
//! names peers that changed.
#![no_main]

use std::collections::BTreeSet;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use weave_router::mesh::gossip::{GossipAction, GossipChannel, GossipData};
use weave_router::mesh::peer::{Peer, PeerName, PeerUid};
use weave_router::mesh::topology::Topology;

fn me() -> Peer {
    Peer {
        name: PeerName::from_u64(1),
        nickname: "me".into(),
        uid: PeerUid(11),
        version: 3,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(entries) = Topology::decode(data) else {
        // Still exercise the gossip path: a bad payload is an error, not a change.
        let mut t = Topology::new(&me());
        assert!(t.on_gossip(data).is_err());
        assert!(t.take_changes().is_empty());
        return;
    };
    assert!(entries.iter().all(|e| e.uid.0 != 0));

    let mut t = Topology::new(&me());
    let changed = t.merge(entries.clone());
    for name in &changed {
        assert!(
            entries.iter().any(|e| e.name == *name),
            "changed a peer it was not told about"
        );
    }
    // Everyone but us (our own entry may have moved on to outrun a stale incarnation).
    let others: BTreeSet<PeerName> = t
        .peers()
        .map(|p| p.name)
        .filter(|n| *n != me().name)
        .collect();
    let enc = t.encode(Some(&others));
    let again = Topology::decode(&enc).expect("our own encoding decodes");
    for e in &again {
        assert_eq!(t.get(e.name), Some(e), "decode(encode(x)) = x");
    }
    let mut t2 = Topology::new(&me());
    t2.merge(again);
    assert_eq!(t2.encode(Some(&others)), enc);
    assert!(Topology::decode(&t.encode(None)).is_ok());

    // The same payload through the gossip channel: the improvement decodes and is all news.
    let now = Instant::now();
    let mut ch = GossipChannel::new("topology", Topology::new(&me()), now);
    let relay = ch
        .on_gossip(now, PeerName::from_u64(2), data)
        .expect("it decoded above");
    assert_eq!(relay.is_some(), !changed.is_empty());
    if let Some(GossipAction::Gossip { payload, exclude }) = relay {
        assert_eq!(exclude, Some(PeerName::from_u64(2)));
        let news = Topology::decode(&payload).expect("improvements decode");
        assert!(!news.is_empty());
        for e in &news {
            assert_eq!(ch.data().get(e.name), Some(e));
        }
    }
});
