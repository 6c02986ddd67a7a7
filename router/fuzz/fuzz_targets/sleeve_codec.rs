//! The sleeve datagram codec: whatever parses re-encodes to the bytes it came from (header,
//! frame records, control bodies), and every control message survives encode → decode.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weave_router::sleeve::codec::{self, Control, Header, MessageType, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Header::parse(data) {
        assert_eq!(h.to_bytes()[..], data[..HEADER_LEN]);
        assert_eq!(Header::parse(&h.to_bytes()), Ok(h));
    }

    let Some((&selector, body)) = data.split_first() else {
        return;
    };

    // Frame records: the good ones re-encode to exactly the bytes before the first bad one.
    let mut frames = codec::frames(body);
    let mut encoded = Vec::new();
    let mut n = 0;
    for f in frames.by_ref() {
        codec::write_frame(&mut encoded, f.src, f.dst, f.data).expect("a decoded frame fits");
        n += 1;
    }
    assert_eq!(codec::frames(body).validate(), (n, frames.error()));
    match frames.error() {
        None => assert_eq!(encoded, body),
        Some(_) => assert!(encoded.len() < body.len() && body.starts_with(&encoded)),
    }

    // Control bodies.
    let encrypted = selector & 0x80 != 0;
    let Some(kind) = MessageType::from_u8(selector & 0x07) else {
        return;
    };
    if let Ok(control) = Control::parse(kind, body, encrypted) {
        assert_eq!(control.kind(), kind);
        let mut out = Vec::new();
        control.write_body(&mut out, encrypted);
        match control {
            // The padding of a probe is not read, only its length; nor that of a frag test.
            Control::PmtuProbe { .. } => {
                assert_eq!(out.len(), body.len());
                assert_eq!(out[..6], body[..6]);
            }
            Control::FragTest { .. } => {
                assert_eq!(out.len(), body.len());
                assert_eq!(out[..4], body[..4]);
            }
            _ => assert_eq!(out, body),
        }
        assert_eq!(Control::parse(kind, &out, encrypted), Ok(control));
    }
    // And from the other side: a control message built from the input round-trips.
    let word = u64::from_be_bytes(core::array::from_fn(|i| body.get(i).copied().unwrap_or(0)));
    let mtu = (word >> 48) as u16;
    let control = match selector & 0x07 {
        0 | 1 => Control::Heartbeat {
            conn_uid: word,
            heard: selector & 0x10 != 0,
            established: selector & 0x20 != 0,
        },
        // Probes are as long as the MTU they test; the fuzzer's inputs stay small.
        2 => Control::PmtuProbe {
            id: word as u32,
            mtu: mtu % 4096,
        },
        3 => Control::PmtuAck {
            id: word as u32,
            mtu,
        },
        4 => Control::FragTest { id: word as u32 },
        5 => Control::FragAck { id: word as u32 },
        _ => Control::KeyReady {
            ack: selector & 0x10 != 0,
        },
    };
    let mut out = Vec::new();
    control.write_body(&mut out, encrypted);
    assert_eq!(Control::parse(control.kind(), &out, encrypted), Ok(control));
    if let Control::PmtuProbe { mtu, .. } = control {
        let tag = if encrypted { codec::TAG_LEN } else { 0 };
        let datagram = HEADER_LEN + out.len() + tag;
        assert!(
            datagram == codec::datagram_len_for_mtu(mtu, encrypted) || out.len() == 6,
            "a probe fills the datagram it tests"
        );
    }
});
