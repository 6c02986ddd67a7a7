//! The TCP coalescer (software GRO): a batch of frames, some built as valid TCP segments of a
//! few flows (runs with the sizes, flags, options and checksums the input picks), some raw.
//!
//! Invariant: segmenting every merged frame the way the kernel does gives back exactly the
//! frames that went in (byte for byte, Ethernet padding aside), in their order within each
//! flow and among the frames that are not TCP; merged frames carry a correct IP checksum and
//! the pseudo-header sum the kernel's checksum offload expects.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use weave_router::checksum::{fold, sum};
use weave_router::gro::{Coalescer, GsoInfo};

const ETH: usize = 14;
const IP: usize = 20;
const ACK: u8 = 0x10;
const PSH: u8 = 0x08;

fn pseudo(frame: &[u8], tcp_len: usize) -> u64 {
    sum(&frame[ETH + 12..ETH + 20], 6 + tcp_len as u64)
}

/// A TCP segment with valid checksums (unless `bad_sum`).
#[allow(clippy::too_many_arguments)]
fn segment(
    flow: u8,
    seq: u32,
    flags: u8,
    df: bool,
    ttl: u8,
    options: &[u8],
    payload: &[u8],
    bad_sum: bool,
) -> Vec<u8> {
    let tcp_len = 20 + options.len();
    let ip_len = IP + tcp_len + payload.len();
    let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&(ip_len as u16).to_be_bytes());
    f.extend_from_slice(&[0x12, 0x34, if df { 0x40 } else { 0 }, 0, ttl, 6, 0, 0]);
    f.extend_from_slice(&[10, 32, 0, flow, 10, 32, 0, 99]);
    f.extend_from_slice(&(40000 + u16::from(flow)).to_be_bytes());
    f.extend_from_slice(&5201u16.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend_from_slice(&77u32.to_be_bytes());
    f.extend_from_slice(&[((tcp_len / 4) as u8) << 4, flags, 0x01, 0xf5, 0, 0, 0, 0]);
    f.extend_from_slice(options);
    f.extend_from_slice(payload);
    let ip_sum = !fold(sum(&f[ETH..ETH + IP], 0));
    f[ETH + 10..ETH + 12].copy_from_slice(&ip_sum.to_be_bytes());
    let t = ETH + IP;
    let tcp_sum = !fold(sum(&f[t..], pseudo(&f, tcp_len + payload.len()))) ^ u16::from(bad_sum);
    f[t + 16..t + 18].copy_from_slice(&tcp_sum.to_be_bytes());
    f
}

/// What the kernel does with a merged frame: cut it into `gso_size` segments with full
/// headers and checksums (reference model, independent of the coalescer).
fn resegment(frame: &[u8], gso: Option<GsoInfo>) -> Vec<Vec<u8>> {
    let Some(gso) = gso else {
        return vec![frame.to_vec()];
    };
    let t = ETH + IP;
    assert_eq!(usize::from(gso.csum_start), t);
    assert_eq!(gso.csum_offset, 16);
    assert_eq!(fold(sum(&frame[ETH..t], 0)), 0xffff, "merged IP checksum");
    assert_eq!(
        usize::from(u16::from_be_bytes([frame[ETH + 2], frame[ETH + 3]])),
        frame.len() - ETH
    );
    let csum = u16::from_be_bytes([frame[t + 16], frame[t + 17]]);
    assert_eq!(
        csum,
        fold(pseudo(frame, frame.len() - t)),
        "pseudo-header sum for offload"
    );
    let hdr = usize::from(gso.hdr_len);
    let size = usize::from(gso.gso_size);
    assert!(
        size > 0 && frame.len() > hdr + size,
        "two segments at least"
    );
    let payload = &frame[hdr..];
    let last = payload.len().div_ceil(size);
    let seq0 = u32::from_be_bytes(frame[t + 4..t + 8].try_into().expect("4 bytes"));
    let psh = frame[t + 13] & PSH != 0;
    payload
        .chunks(size)
        .enumerate()
        .map(|(i, chunk)| {
            let mut f = frame[..hdr].to_vec();
            f.extend_from_slice(chunk);
            let ip_len = (f.len() - ETH) as u16;
            f[ETH + 2..ETH + 4].copy_from_slice(&ip_len.to_be_bytes());
            f[ETH + 10..ETH + 12].copy_from_slice(&[0, 0]);
            let ip_sum = !fold(sum(&f[ETH..t], 0));
            f[ETH + 10..ETH + 12].copy_from_slice(&ip_sum.to_be_bytes());
            let seq = seq0.wrapping_add((i * size) as u32);
            f[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
            if !(psh && i + 1 == last) {
                f[t + 13] &= !PSH;
            }
            f[t + 16..t + 18].copy_from_slice(&[0, 0]);
            let tcp_sum = !fold(sum(&f[t..], pseudo(&f, f.len() - t)));
            f[t + 16..t + 18].copy_from_slice(&tcp_sum.to_be_bytes());
            f
        })
        .collect()
}

/// The flow of a frame the coalescer can take apart (IPv4 without options, TCP, lengths
/// consistent), or `None` for frames it passes through untouched.
fn flow(f: &[u8]) -> Option<[u8; 24]> {
    if f.len() < ETH + IP || f[12..14] != [0x08, 0x00] || f[ETH] != 0x45 || f[ETH + 9] != 6 {
        return None;
    }
    let ip_len = usize::from(u16::from_be_bytes([f[ETH + 2], f[ETH + 3]]));
    let tcp_len = ip_len.checked_sub(IP)?;
    if ip_len > f.len() - ETH || tcp_len < 20 || usize::from(f[ETH + IP + 12] >> 4) * 4 > tcp_len {
        return None;
    }
    let mut k = [0; 24];
    k[..12].copy_from_slice(&f[..12]);
    k[12..20].copy_from_slice(&f[ETH + 12..ETH + 20]);
    k[20..].copy_from_slice(&f[ETH + IP..ETH + IP + 4]);
    Some(k)
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let mut seqs = [0u32; 3];
    let mut inputs = Vec::new();
    for _ in 0..u.int_in_range(1..=40)? {
        if u.ratio(1, 5)? {
            let len = u.arbitrary_len::<u8>()?;
            inputs.push(u.bytes(len)?.to_vec());
            continue;
        }
        let flow = u.int_in_range(0..=2u8)?;
        let f = usize::from(flow);
        if u.ratio(1, 8)? {
            seqs[f] = u.arbitrary()?;
        }
        let len = u.int_in_range(0..=300)?;
        let payload: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(flow + 3)).collect();
        let flags = if u.ratio(7, 8)? {
            ACK | if u.ratio(1, 6)? { PSH } else { 0 }
        } else {
            u.arbitrary()?
        };
        let options: &[u8] = match u.int_in_range(0..=3)? {
            0 => &[],
            1 => &[1, 1, 8, 10, 0, 0, 0, 7, 0, 0, 0, 9],
            2 => &[1, 1, 8, 10, 0, 0, 0, 8, 0, 0, 0, 9],
            _ => &[1, 1, 1, 1],
        };
        let df = u.ratio(9, 10)?;
        let ttl = if u.ratio(9, 10)? { 64 } else { 63 };
        let bad_sum = u.ratio(1, 20)?;
        let mut frame = segment(flow, seqs[f], flags, df, ttl, options, &payload, bad_sum);
        if u.ratio(1, 20)? {
            // Ethernet padding after the IP packet.
            frame.resize(frame.len() + u.int_in_range(1..=20)?, 0);
        }
        seqs[f] = seqs[f].wrapping_add(len as u32);
        inputs.push(frame);
    }

    let mut c = Coalescer::new();
    if u.ratio(1, 10)? {
        c.disable();
    }
    for f in &inputs {
        c.push(f);
    }
    let mut out = Vec::new();
    let mut merged = 0;
    {
        let mut d = c.drain();
        while let Some(x) = d.next_frame() {
            merged += 1;
            out.extend(resegment(x.frame, x.gso));
        }
    }
    assert!(c.is_empty());
    assert_eq!(c.stats().frames_in, inputs.len() as u64);
    assert_eq!(c.stats().frames_out, merged);
    assert_eq!(
        out.len(),
        inputs.len(),
        "as many frames come back as went in"
    );

    // Per flow, and among the other frames, the same frames in the same order.
    let by_flow = |frames: &[Vec<u8>]| {
        let mut m: BTreeMap<Option<[u8; 24]>, Vec<Vec<u8>>> = BTreeMap::new();
        for f in frames {
            m.entry(flow(f)).or_default().push(f.clone());
        }
        m
    };
    let (got, want) = (by_flow(&out), by_flow(&inputs));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (k, want) in &want {
        for (g, w) in got[k].iter().zip(want) {
            if g != w {
                // Only Ethernet padding after the IP packet may go.
                assert!(
                    w.starts_with(g),
                    "frame changed:\n got {g:02x?}\nwant {w:02x?}"
                );
                assert_eq!(
                    g.len(),
                    ETH + usize::from(u16::from_be_bytes([w[ETH + 2], w[ETH + 3]])),
                    "frame changed beyond its padding"
                );
            }
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
