//! Two sleeve forwarders wired back to back, driven by the input: frames queued on one side,
//! datagrams delivered (or lost), garbage datagrams injected, clocks advanced, path MTU
//! changes and rekeys. Every frame that arrives is one that was queued, intact, at most once,
//! in order per path; nothing is lost unless the sender counted a drop; garbage never
//! delivers frames on an encrypted connection.
#![no_main]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use weave_router::sleeve::{Forwarder, ForwarderConfig, PeerName, Received, SessionKeys};

const A: u8 = 1;
const B: u8 = 2;

struct Side {
    fwd: Forwarder<u8>,
    name: PeerName,
    /// Sequence number of the next frame queued here.
    next_seq: u32,
    /// Frames queued and not yet seen at the other end: seq → (df, bytes).
    in_flight: HashMap<u32, (bool, Vec<u8>)>,
    /// Last sequence number received from the other side, per path.
    last_seen: [Option<u32>; 2],
    /// A datagram from here was lost or refused: frames in it may be gone.
    lost: bool,
}

fn keys(epoch: u32, send: u8, recv: u8) -> SessionKeys {
    SessionKeys {
        epoch,
        send: [send; 32],
        recv: [recv; 32],
    }
}

/// Frames carry `[seq u32][df u8]` first so the receiver can check them.
fn frame(seq: u32, df: bool, fill: &[u8]) -> Vec<u8> {
    let mut f = seq.to_be_bytes().to_vec();
    f.push(u8::from(df));
    f.extend_from_slice(fill);
    f
}

/// Send everything `from` has (when `lose` is false, deliver it to `to`).
fn flush(now: Instant, from: &mut Side, to: &mut Side, from_addr: u8, lose: bool) {
    let mut buf = Vec::new();
    while let Some(t) = from.fwd.poll_transmit(now, &mut buf) {
        assert_eq!(t.size, buf.len());
        assert!(t.size <= weave_router::sleeve::codec::MAX_UDP_PAYLOAD);
        if lose {
            from.lost = true;
            continue;
        }
        let frames = match to.fwd.handle_datagram(now, from_addr, &mut buf) {
            Ok(Received::Frames(frames)) => frames,
            Ok(Received::Control) => continue,
            Err(_) => {
                from.lost = true;
                continue;
            }
        };
        for f in frames {
            assert_eq!((f.src, f.dst), (from.name, to.name));
            let seq = u32::from_be_bytes(f.data[..4].try_into().expect("4 bytes"));
            let df = f.data[4] != 0;
            let (queued_df, bytes) = from.in_flight.remove(&seq).expect("queued once, seen once");
            assert_eq!((queued_df, bytes.as_slice()), (df, f.data));
            let last = &mut to.last_seen[usize::from(df)];
            assert!(last.is_none_or(|l| l < seq), "in order per path");
            *last = Some(seq);
        }
    }
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let encrypted: bool = u.arbitrary()?;
    let start = Instant::now();
    let mut now = start;
    let (na, nb) = (PeerName::from_u64(0xa), PeerName::from_u64(0xb));
    let mut cfg_a = ForwarderConfig::new(na, nb, 77);
    let mut cfg_b = ForwarderConfig::new(nb, na, 77);
    let cap = u.int_in_range(1..=8)?;
    cfg_a.queue_capacity = cap;
    cfg_b.queue_capacity = cap;
    let mut epoch = 0;
    let side = |cfg, name, k: Option<SessionKeys>, addr| Side {
        fwd: Forwarder::new(start, cfg, k, addr),
        name,
        next_seq: 0,
        in_flight: HashMap::new(),
        last_seen: [None; 2],
        lost: false,
    };
    let mut a = side(cfg_a, na, encrypted.then(|| keys(0, 1, 2)), Some(B));
    let mut b = side(cfg_b, nb, encrypted.then(|| keys(0, 2, 1)), None);
    let mut garbage_frames = 0usize;

    for _ in 0..u.int_in_range(0..=64)? {
        let a_to_b: bool = u.arbitrary()?;
        let (from, to, from_addr) = if a_to_b {
            (&mut a, &mut b, A)
        } else {
            (&mut b, &mut a, B)
        };
        match u.int_in_range(0..=6)? {
            0 | 1 => {
                let df: bool = u.arbitrary()?;
                let len = u.int_in_range(0..=2000)?;
                let fill = u.bytes(len.min(u.len()))?;
                let f = frame(from.next_seq, df, fill);
                if from.fwd.queue_frame(from.name, to.name, &f, df).is_ok() {
                    from.in_flight.insert(from.next_seq, (df, f));
                }
                from.next_seq += 1;
            }
            2 => flush(now, from, to, from_addr, false),
            3 => flush(now, from, to, from_addr, true),
            4 => {
                let sender: u8 = u.arbitrary()?;
                let len = u.arbitrary_len::<u8>()?;
                let mut datagram = u.bytes(len)?.to_vec();
                if let Ok(Received::Frames(frames)) =
                    to.fwd.handle_datagram(now, sender, &mut datagram)
                {
                    garbage_frames += frames.count();
                }
            }
            5 => {
                now += Duration::from_millis(u.int_in_range(0..=70_000)?);
                a.fwd.handle_timeout(now);
                b.fwd.handle_timeout(now);
            }
            _ => {
                if u.arbitrary()? {
                    from.fwd.note_path_mtu(now, u.arbitrary()?);
                } else {
                    epoch += 1;
                    a.fwd
                        .rekey(now, keys(epoch, 1 + epoch as u8, 2 + epoch as u8));
                    b.fwd
                        .rekey(now, keys(epoch, 2 + epoch as u8, 1 + epoch as u8));
                }
            }
        }
        while a.fwd.poll_event().is_some() || b.fwd.poll_event().is_some() {}
    }
    // Deliver what is left (no time passes, so nothing expires) and account for every frame.
    flush(now, &mut a, &mut b, A, false);
    flush(now, &mut b, &mut a, B, false);
    for s in [&a, &b] {
        if !s.lost && !s.fwd.is_closed() && s.fwd.drops().total() == 0 {
            assert!(
                s.in_flight.is_empty(),
                "frames lost without a drop: {:?}",
                s.in_flight.keys()
            );
        }
    }
    if encrypted {
        assert_eq!(garbage_frames, 0, "forged datagrams delivered frames");
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
