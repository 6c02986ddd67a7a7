//! The mesh TCP message layer: the length-prefixed frame codec and two established
//! connections (plaintext or encrypted) exchanging messages, rekeying, with the stream cut
//! anywhere, and garbage or flipped bytes on the way.
//!
//! Invariants: frames come out of the codec exactly as encoded, however the stream is split;
//! every message arrives exactly as sent and in order while nobody tampered; on an encrypted
//! connection tampering never delivers a message that was not sent; both ends of a rekey get
//! matching UDP keys.
#![no_main]

use std::time::Instant;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use weave_router::mesh::conn::{Conn, ConnConfig, ConnEvent, Message, UdpKeys};
use weave_router::mesh::handshake::{Established, SessionKeys};
use weave_router::mesh::peer::{Peer, PeerName, PeerUid};
use weave_router::mesh::wire::FrameCodec;

#[path = "fuzz_rng.rs"]
mod fuzz_rng;
use fuzz_rng::FuzzRng;

fn frame_codec(u: &mut Unstructured<'_>) -> Result<()> {
    let max = u.int_in_range(0..=300)?;
    let bodies: Vec<Vec<u8>> = u.arbitrary()?;
    let mut stream = Vec::new();
    let mut sent = Vec::new();
    for b in &bodies {
        match FrameCodec::encode(b, max, &mut stream) {
            Ok(()) => sent.push(b.clone()),
            Err(_) => assert!(b.len() > max),
        }
    }
    let mut codec = FrameCodec::new(max);
    let mut got = Vec::new();
    let mut rest = stream.as_slice();
    while !rest.is_empty() {
        let n = u.int_in_range(1..=rest.len())?;
        codec.push(&rest[..n]);
        rest = &rest[n..];
        while let Some(f) = codec
            .next_frame()
            .expect("encoded frames are within the cap")
        {
            got.push(f);
        }
    }
    assert_eq!(got, sent);
    assert!(codec.buffered().is_empty());
    // And arbitrary bytes: whatever comes out is within the cap, and it never panics.
    let mut codec = FrameCodec::new(max);
    codec.push(u.bytes(u.len())?);
    while let Ok(Some(f)) = codec.next_frame() {
        assert!(f.len() <= max);
    }
    Ok(())
}

fn channel_name(u: &mut Unstructured<'_>) -> Result<(String, String)> {
    let s: String = u.arbitrary()?;
    // Channel names go out truncated to 255 bytes at a char boundary.
    let mut end = s.len().min(255);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Ok((s[..end].to_string(), s))
}

/// A message to send, and the one that must arrive.
fn message(u: &mut Unstructured<'_>) -> Result<(Message, Message)> {
    let src = PeerName::from_u64(u.arbitrary()?);
    let payload: Vec<u8> = u.arbitrary()?;
    Ok(match u.int_in_range(0..=5)? {
        0 => (Message::Heartbeat, Message::Heartbeat),
        1 => {
            let (c, full) = channel_name(u)?;
            (
                Message::Gossip {
                    channel: full,
                    src,
                    payload: payload.clone(),
                },
                Message::Gossip {
                    channel: c,
                    src,
                    payload,
                },
            )
        }
        2 => {
            let (c, full) = channel_name(u)?;
            let dst = PeerName::from_u64(u.arbitrary()?);
            (
                Message::GossipUnicast {
                    channel: full,
                    src,
                    dst,
                    payload: payload.clone(),
                },
                Message::GossipUnicast {
                    channel: c,
                    src,
                    dst,
                    payload,
                },
            )
        }
        3 => {
            let (c, full) = channel_name(u)?;
            (
                Message::GossipBroadcast {
                    channel: full,
                    src,
                    payload: payload.clone(),
                },
                Message::GossipBroadcast {
                    channel: c,
                    src,
                    payload,
                },
            )
        }
        4 => {
            let index = u.arbitrary()?;
            (
                Message::OverlayControl {
                    index,
                    body: payload.clone(),
                },
                Message::OverlayControl {
                    index,
                    body: payload,
                },
            )
        }
        _ => {
            // Tags the protocol does not use.
            let t = *u.choose(&[1u8, 2, 3, 8, 9, 15, 18, 100, 255])?;
            (Message::Unknown(t), Message::Unknown(t))
        }
    })
}

fn established(outbound: bool, encrypted: bool) -> Established {
    let (me, them) = if outbound { (1u8, 2u8) } else { (2, 1) };
    Established {
        remote: Peer {
            name: PeerName::from_u64(u64::from(them)),
            nickname: format!("peer{them}"),
            uid: PeerUid(u64::from(them)),
            version: 0,
        },
        remote_version: 4,
        keys: encrypted.then(|| SessionKeys {
            tcp_send: [me; 32],
            tcp_recv: [them; 32],
            udp_send: [me + 10; 32],
            udp_recv: [them + 10; 32],
            chain: [7; 32],
            epoch: 0,
            transcript_hash: [9; 32],
        }),
        encrypted,
        outbound,
        conn_uid: 42,
        remote_trusts_us: false,
        we_trust_remote: false,
        transcript_hash: [9; 32],
        leftover: Vec::new(),
    }
}

struct End {
    conn: Conn<FuzzRng>,
    /// Bytes sent and not yet delivered.
    wire: Vec<u8>,
    /// Messages sent, not yet received (what must arrive).
    expect: std::collections::VecDeque<Message>,
    /// Bytes towards this end were altered: from then on only weaker checks hold.
    tampered: bool,
    failed: bool,
    udp_keys: Vec<UdpKeys>,
}

fn conns(u: &mut Unstructured<'_>) -> Result<()> {
    let encrypted: bool = u.arbitrary()?;
    let now = Instant::now();
    let mut ends = [true, false].map(|outbound| End {
        conn: Conn::new(
            &established(outbound, encrypted),
            ConnConfig::default(),
            now,
            FuzzRng(u64::from(outbound)),
        )
        .expect("no leftover"),
        wire: Vec::new(),
        expect: Default::default(),
        tampered: false,
        failed: false,
        udp_keys: Vec::new(),
    });
    for _ in 0..u.int_in_range(0..=48)? {
        let from = usize::from(u.arbitrary::<bool>()?);
        let to = 1 - from;
        match u.int_in_range(0..=4)? {
            0 | 1 => {
                let (send, arrive) = message(u)?;
                if ends[from].conn.send(&send).is_ok() {
                    ends[from].expect.push_back(arrive);
                }
            }
            2 => {
                let _ = ends[from].conn.start_rekey(now);
            }
            3 => {
                // Flip a byte or inject garbage into the stream towards `to`.
                let garbage: Vec<u8> = u.arbitrary()?;
                let w = &mut ends[from].wire;
                if !w.is_empty() && u.arbitrary()? {
                    let at = u.choose_index(w.len())?;
                    w[at] ^= u.int_in_range(1..=255)?;
                } else {
                    let at = u.int_in_range(0..=w.len())?;
                    w.splice(at..at, garbage);
                }
                ends[to].tampered = true;
            }
            _ => {}
        }
        // Deliver part of the stream.
        for i in 0..2 {
            while let Some(b) = ends[i].conn.poll_transmit() {
                ends[i].wire.extend_from_slice(&b);
            }
        }
        let n = u.int_in_range(0..=ends[from].wire.len())?;
        let chunk: Vec<u8> = ends[from].wire.drain(..n).collect();
        let [a, b] = &mut ends;
        let (src, dst) = if from == 0 { (a, b) } else { (b, a) };
        if dst.failed {
            continue;
        }
        if dst.conn.on_bytes(now, &chunk).is_err() {
            dst.failed = true;
            assert!(dst.tampered, "an untouched stream failed");
        }
        while let Some(ev) = dst.conn.poll_event() {
            match ev {
                ConnEvent::Message(m) => {
                    if dst.tampered && !encrypted {
                        continue;
                    }
                    let want = src.expect.pop_front();
                    assert_eq!(Some(m), want, "messages arrive as sent, in order");
                }
                ConnEvent::NewUdpKeys(k) => dst.udp_keys.push(k),
            }
        }
    }
    // Keys for each epoch match crosswise between the ends (one end may be behind).
    for (ka, kb) in ends[0].udp_keys.iter().zip(&ends[1].udp_keys) {
        assert_eq!(ka.epoch, kb.epoch);
        assert_eq!((ka.send, ka.recv), (kb.recv, kb.send));
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = match u.arbitrary::<bool>() {
        Ok(true) => conns(&mut u),
        _ => frame_codec(&mut u),
    };
});
