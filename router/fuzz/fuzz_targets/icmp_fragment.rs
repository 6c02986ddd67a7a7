//! The ICMP "fragmentation needed" builder and the IPv4 fragmenter, on frames that are
//! partly built from the input (so the interesting paths are reached) and partly raw.
//!
//! Fragmenter: pieces fit the limit, carry multiples of 8 bytes but the last, have valid
//! header checksums and total lengths, and reassemble (by their offsets) to the original
//! payload at its original offset, with MF only where the original allows it.
//! ICMP: addresses swapped, both checksums valid, lengths consistent, the offending header
//! and at most 8 bytes of its payload quoted, and never an answer to a non-first fragment.
#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use weave_router::checksum::{fold, sum};
use weave_router::{fragment, icmp};

const ETH: usize = 14;
const IP: usize = 20;

fn ipv4_frame(u: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
    let payload_len = u.int_in_range(0..=9000usize)?;
    let flags: u16 = u.arbitrary()?;
    let proto = *u.choose(&[1u8, 6, 17, 47])?;
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&((IP + payload_len) as u16).to_be_bytes());
    f.extend_from_slice(&[0xab, 0xcd]);
    f.extend_from_slice(&flags.to_be_bytes());
    f.extend_from_slice(&[64, proto, 0, 0, 10, 32, 1, 2, 10, 32, 1, 1]);
    let c = !fold(sum(&f[ETH..], 0));
    f[ETH + 10..ETH + 12].copy_from_slice(&c.to_be_bytes());
    let head = u.bytes(u.len().min(16))?.to_vec();
    f.extend_from_slice(&head);
    f.extend((head.len()..payload_len).map(|i| (i * 7) as u8));
    Ok(f)
}

fn check_fragments(frame: &[u8], limit: usize) {
    let Some(pieces) = fragment::fragment(frame, limit) else {
        return;
    };
    let ip = &frame[ETH..];
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if pieces.len() == 1 && pieces[0].len() == ETH + total && ETH + total <= limit {
        assert_eq!(pieces[0], frame[..ETH + total]);
        return;
    }
    let field = u16::from_be_bytes([ip[6], ip[7]]);
    let base = usize::from(field & 0x1fff) * 8;
    let more = field & 0x2000 != 0;
    let original = &ip[IP..total];
    let mut payload = vec![None; base + original.len()];
    for (i, p) in pieces.iter().enumerate() {
        assert!(
            p.len() <= limit,
            "piece of {} bytes over the limit {limit}",
            p.len()
        );
        assert_eq!(p[..ETH], frame[..ETH]);
        let pip = &p[ETH..];
        assert_eq!(fold(sum(&pip[..IP], 0)), 0xffff, "header checksum");
        assert_eq!(usize::from(u16::from_be_bytes([pip[2], pip[3]])), pip.len());
        assert_eq!(pip[4..6], ip[4..6], "identification kept");
        assert_eq!(pip[8..10], ip[8..10], "TTL and protocol kept");
        assert_eq!(pip[12..20], ip[12..20], "addresses kept");
        let f = u16::from_be_bytes([pip[6], pip[7]]);
        let data = &pip[IP..];
        let last = i + 1 == pieces.len();
        assert!(last || data.len() % 8 == 0);
        assert_eq!(f & 0x2000 != 0, !last || more, "MF");
        let offset = usize::from(f & 0x1fff) * 8;
        for (j, b) in data.iter().enumerate() {
            let slot = payload
                .get_mut(offset + j)
                .expect("piece inside the packet");
            assert!(slot.is_none(), "pieces overlap");
            *slot = Some(*b);
        }
    }
    let (before, after) = payload.split_at(base);
    assert!(before.iter().all(Option::is_none));
    let after: Option<Vec<u8>> = after.iter().copied().collect();
    assert_eq!(
        after.as_deref(),
        Some(original),
        "pieces reassemble to the payload"
    );
}

fn check_icmp(frame: &[u8], mtu: u16) {
    let Some(reply) = icmp::frag_needed(frame, mtu) else {
        return;
    };
    let ip = &frame[ETH..];
    let hl = usize::from(ip[0] & 0x0f) * 4;
    assert_eq!(ip[0] >> 4, 4);
    assert_eq!(
        u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff,
        0,
        "never answers a later fragment"
    );
    assert_eq!(reply[..6], frame[6..12]);
    assert_eq!(reply[6..12], frame[..6]);
    assert_eq!(reply[12..14], [0x08, 0x00]);
    let rip = &reply[ETH..];
    assert_eq!(usize::from(u16::from_be_bytes([rip[2], rip[3]])), rip.len());
    assert_eq!(fold(sum(&rip[..IP], 0)), 0xffff);
    assert_eq!(rip[9], 1);
    assert_eq!(rip[12..16], ip[16..20]);
    assert_eq!(rip[16..20], ip[12..16]);
    let msg = &rip[IP..];
    assert_eq!(fold(sum(msg, 0)), 0xffff, "ICMP checksum");
    assert_eq!(msg[..2], [3, 4]);
    assert_eq!(u16::from_be_bytes([msg[6], msg[7]]), mtu);
    let quoted = &msg[8..];
    assert!(quoted.len() >= hl && quoted.len() <= hl + 8);
    assert_eq!(quoted, &ip[..quoted.len()]);
    if ip[9] == 1 {
        assert!(matches!(ip[hl], 0 | 8 | 13..=18), "answered an ICMP error");
    }
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let frame = if u.arbitrary()? {
        ipv4_frame(u)?
    } else {
        let len = u.arbitrary_len::<u8>()?;
        u.bytes(len)?.to_vec()
    };
    let limit = u.int_in_range(0..=10_000)?;
    let mtu = u.arbitrary()?;
    check_fragments(&frame, limit);
    check_icmp(&frame, mtu);
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
