//! The mesh handshake (CPace in password mode), from both roles.
//!
//! Raw mode: the input is everything the remote sends, in chunks, to a dialler or a listener.
//! Without the password nobody completes a password handshake, and unauthenticated bytes
//! never make a target permanently failed (self, name collision).
//!
//! Relay mode: a real dialler and a real listener, with an attacker in the middle that
//! splits, drops, flips and injects bytes. Whenever both ends complete (in plaintext mode:
//! and nobody tampered), they agree on everything (keys crosswise, transcript, connection
//! UID, who is who); with different passwords neither end completes (unless it has no
//! password and the man in the middle completed it).
#![no_main]

use std::sync::OnceLock;
use std::time::Instant;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use weave_router::mesh::handshake::{
    Established, Handshake, HandshakeConfig, HandshakeError, KdfParams, Progress,
};
use weave_router::mesh::peer::{PeerName, PeerUid};

#[path = "fuzz_rng.rs"]
mod fuzz_rng;
use fuzz_rng::FuzzRng;

/// Configs of peer 1 and peer 2: no password, password "a", password "b" (stretched once).
fn configs() -> &'static [[HandshakeConfig; 2]; 3] {
    static CONFIGS: OnceLock<[[HandshakeConfig; 2]; 3]> = OnceLock::new();
    CONFIGS.get_or_init(|| {
        let make = |n: u64, password: Option<&[u8]>| {
            let mut c =
                HandshakeConfig::new(PeerName::from_u64(n), format!("peer{n}"), PeerUid(n * 100));
            c.password = password.map(<[u8]>::to_vec);
            c.kdf = KdfParams::INSECURE_FAST;
            c.stretched_password().expect("stretching works");
            c
        };
        [None, Some(&b"a"[..]), Some(&b"b"[..])].map(|p| [make(1, p), make(2, p)])
    })
}

fn raw(u: &mut Unstructured<'_>) -> Result<()> {
    let mode = u.int_in_range(0..=1)?;
    let outbound: bool = u.arbitrary()?;
    let mut rng = FuzzRng(u.arbitrary()?);
    let now = Instant::now();
    let mut hs = Handshake::new(&configs()[mode][0], outbound, now, &mut rng);
    while hs.poll_transmit().is_some() {}
    while !u.is_empty() {
        let len = u.arbitrary_len::<u8>()?;
        match hs.on_bytes(now, u.bytes(len)?) {
            Ok(Progress::Pending) => {}
            Ok(Progress::Established(e)) => {
                assert_eq!(
                    mode, 0,
                    "completed a password handshake without the password"
                );
                assert!(e.keys.is_none() && !e.encrypted);
                assert_eq!(e.outbound, outbound);
                return Ok(());
            }
            Err(e) => {
                assert!(
                    !e.is_permanent(),
                    "unauthenticated bytes made a permanent failure: {e}"
                );
                return Ok(());
            }
        }
        while hs.poll_transmit().is_some() {}
    }
    Ok(())
}

fn relay(u: &mut Unstructured<'_>) -> Result<()> {
    let (mode_a, mode_b) = match u.int_in_range(0..=3)? {
        0 => (0, 0),
        1 => (1, 1),
        2 => (1, 2),
        _ => (0, 1),
    };
    let now = Instant::now();
    let mut rng = FuzzRng(u.arbitrary()?);
    let mut ends = [
        Handshake::new(&configs()[mode_a][0], true, now, &mut rng),
        Handshake::new(&configs()[mode_b][1], false, now, &mut rng),
    ];
    let mut pending: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    let mut done: [Option<std::result::Result<Box<Established>, HandshakeError>>; 2] = [None, None];
    let mut tampered = false;
    for _ in 0..u.int_in_range(1..=40)? {
        for (i, end) in ends.iter_mut().enumerate() {
            while let Some(b) = end.poll_transmit() {
                pending[i].extend_from_slice(&b);
            }
        }
        let from = usize::from(u.arbitrary::<bool>()?);
        let to = 1 - from;
        let take = if u.ratio(3, 4)? {
            pending[from].len()
        } else {
            u.int_in_range(0..=pending[from].len())?
        };
        let mut chunk: Vec<u8> = pending[from].drain(..take).collect();
        match u.int_in_range(0..=9)? {
            0 if !chunk.is_empty() => {
                let at = u.choose_index(chunk.len())?;
                chunk[at] ^= u.int_in_range(1..=255)?;
                tampered = true;
            }
            1 => {
                let len = u.arbitrary_len::<u8>()?;
                chunk.extend_from_slice(u.bytes(len.min(64))?);
                tampered = true;
            }
            2 if !chunk.is_empty() => {
                chunk.clear();
                tampered = true;
            }
            _ => {}
        }
        if done[to].is_none() && !chunk.is_empty() {
            match ends[to].on_bytes(now, &chunk) {
                Ok(Progress::Pending) => {}
                Ok(Progress::Established(e)) => done[to] = Some(Ok(e)),
                Err(e) => done[to] = Some(Err(e)),
            }
        }
    }
    // With different passwords nobody completes; only an end without a password may be
    // completed by a man in the middle (there is nothing to check its peer against).
    let modes = [mode_a, mode_b];
    for (i, d) in done.iter().enumerate() {
        if modes[i] != modes[1 - i] && matches!(d, Some(Ok(_))) {
            assert!(
                modes[i] == 0 && tampered,
                "completed with different passwords (modes {modes:?}, tampered {tampered})"
            );
        }
    }
    if let [Some(Ok(a)), Some(Ok(b))] = &done {
        // Without a password a man in the middle may change anything (that is the point of
        // the password); with one, tampering must never leave the two ends disagreeing.
        if tampered && !(a.encrypted || b.encrypted) {
            return Ok(());
        }
        assert!(a.outbound && !b.outbound);
        assert_eq!(
            (a.remote.name, a.remote.uid),
            (PeerName::from_u64(2), PeerUid(200))
        );
        assert_eq!(
            (b.remote.name, b.remote.uid),
            (PeerName::from_u64(1), PeerUid(100))
        );
        assert_eq!(a.conn_uid, b.conn_uid);
        assert_eq!(a.encrypted, b.encrypted);
        match (&a.keys, &b.keys) {
            (None, None) => assert!(!a.encrypted),
            (Some(ka), Some(kb)) => {
                assert!(a.encrypted);
                assert_eq!(a.transcript_hash, b.transcript_hash);
                assert_eq!((ka.tcp_send, ka.udp_send), (kb.tcp_recv, kb.udp_recv));
                assert_eq!((ka.tcp_recv, ka.udp_recv), (kb.tcp_send, kb.udp_send));
                assert_eq!((ka.chain, ka.epoch), (kb.chain, kb.epoch));
            }
            _ => panic!("one end encrypted, the other not"),
        }
        if !tampered {
            assert!(a.leftover.is_empty() && b.leftover.is_empty());
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = match u.arbitrary::<bool>() {
        Ok(true) => relay(&mut u),
        _ => raw(&mut u),
    };
});
