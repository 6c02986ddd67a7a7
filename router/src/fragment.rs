//! IPv4 fragmentation by the router (pure; spec router §4.8).
//!
//! An oversized frame whose IPv4 packet allows fragmentation (no DF) normally rides in one
//! big UDP datagram that the kernel fragments. When the fragmentation test showed that such
//! datagrams do not reach the peer (a firewall dropping fragments, say), the router cuts the
//! inner IPv4 packet itself, as a router on the path would (RFC 791), and sends every piece on
//! the DF path; the receiving container's kernel reassembles them.

use crate::checksum::{fold, sum};

const ETH_LEN: usize = 14;
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const IPV4_LEN: usize = 20;
const IP_DF: u16 = 0x4000;
const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;

/// Is `frame` IPv4 that may be fragmented (no DF, no IP options)?
pub fn fragmentable(frame: &[u8]) -> bool {
    frame.get(12..14) == Some(&ETHERTYPE_IPV4)
        && frame.get(ETH_LEN) == Some(&0x45)
        && frame
            .get(ETH_LEN + 6..ETH_LEN + 8)
            .is_some_and(|f| u16::from_be_bytes([f[0], f[1]]) & IP_DF == 0)
}

/// Cut `frame` (Ethernet + IPv4 without DF or options) into frames of at most `max_frame_len`
/// bytes. `None` when it cannot be done: not fragmentable, malformed, or a limit too small
/// for 8 bytes of payload. A frame that already fits comes back whole.
pub fn fragment(frame: &[u8], max_frame_len: usize) -> Option<Vec<Vec<u8>>> {
    if !fragmentable(frame) {
        return None;
    }
    let ip = &frame[ETH_LEN..];
    let total_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if total_len < IPV4_LEN || total_len > ip.len() {
        return None;
    }
    if ETH_LEN + total_len <= max_frame_len {
        return Some(vec![frame[..ETH_LEN + total_len].to_vec()]);
    }
    // Every piece but the last carries a multiple of 8 bytes.
    let per_piece = max_frame_len.checked_sub(ETH_LEN + IPV4_LEN)? / 8 * 8;
    if per_piece == 0 {
        return None;
    }
    let flags = u16::from_be_bytes([ip[6], ip[7]]);
    let base_offset = usize::from(flags & IP_OFFSET_MASK) * 8;
    let more_after = flags & IP_MF != 0;
    let payload = &ip[IPV4_LEN..total_len];
    // A packet that would end past the largest IPv4 datagram is malformed (the receiver drops
    // it), and its pieces' offsets would not fit the 13-bit field: refuse it rather than wrap.
    if base_offset + payload.len() > usize::from(u16::MAX) - IPV4_LEN {
        return None;
    }
    let pieces = payload
        .chunks(per_piece)
        .enumerate()
        .map(|(i, chunk)| {
            let last = (i + 1) * per_piece >= payload.len();
            let offset = (base_offset + i * per_piece) / 8;
            let mut field = offset as u16 & IP_OFFSET_MASK;
            if !last || more_after {
                field |= IP_MF;
            }
            let mut piece = Vec::with_capacity(ETH_LEN + IPV4_LEN + chunk.len());
            piece.extend_from_slice(&frame[..ETH_LEN + IPV4_LEN]);
            piece.extend_from_slice(chunk);
            let h = &mut piece[ETH_LEN..ETH_LEN + IPV4_LEN];
            h[2..4].copy_from_slice(&((IPV4_LEN + chunk.len()) as u16).to_be_bytes());
            h[6..8].copy_from_slice(&field.to_be_bytes());
            h[10..12].copy_from_slice(&[0, 0]);
            let checksum = !fold(sum(h, 0));
            h[10..12].copy_from_slice(&checksum.to_be_bytes());
            piece
        })
        .collect();
    Some(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn udp_frame(payload_len: usize, flags: u16) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
        let total = (IPV4_LEN + payload_len) as u16;
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&[0xab, 0xcd]);
        f.extend_from_slice(&flags.to_be_bytes());
        f.extend_from_slice(&[64, 17, 0, 0, 10, 35, 1, 2, 10, 35, 1, 1]);
        let c = !fold(sum(&f[ETH_LEN..], 0));
        f[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&c.to_be_bytes());
        f.extend((0..payload_len).map(|i| (i * 7) as u8));
        f
    }

    /// What the receiving kernel does: put the payload back together from the offsets.
    fn reassemble(pieces: &[Vec<u8>]) -> (Vec<u8>, bool) {
        let mut payload = Vec::new();
        let mut last_mf = true;
        for p in pieces {
            let ip = &p[ETH_LEN..];
            assert_eq!(fold(sum(&ip[..IPV4_LEN], 0)), 0xffff, "header checksum");
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            assert_eq!(total, ip.len());
            let field = u16::from_be_bytes([ip[6], ip[7]]);
            let offset = usize::from(field & IP_OFFSET_MASK) * 8;
            let data = &ip[IPV4_LEN..];
            if payload.len() < offset + data.len() {
                payload.resize(offset + data.len(), 0);
            }
            payload[offset..offset + data.len()].copy_from_slice(data);
            last_mf = field & IP_MF != 0;
            assert_eq!(ip[4..6], [0xab, 0xcd], "same identification");
        }
        (payload, last_mf)
    }

    #[test]
    fn cuts_a_big_packet_into_pieces_that_fit() {
        let frame = udp_frame(8000, 0);
        let pieces = fragment(&frame, 1400).expect("pieces");
        assert_eq!(pieces.len(), 6);
        assert!(pieces.iter().all(|p| p.len() <= 1400));
        assert!(pieces[..5]
            .iter()
            .all(|p| (p.len() - ETH_LEN - IPV4_LEN).is_multiple_of(8)));
        let (payload, last_mf) = reassemble(&pieces);
        assert_eq!(payload, frame[ETH_LEN + IPV4_LEN..]);
        assert!(!last_mf);
    }

    #[test]
    fn refuses_df_options_and_tiny_limits() {
        assert_eq!(fragment(&udp_frame(3000, IP_DF), 1400), None);
        let mut options = udp_frame(3000, 0);
        options[ETH_LEN] = 0x46;
        assert_eq!(fragment(&options, 1400), None);
        assert_eq!(fragment(&udp_frame(3000, 0), ETH_LEN + IPV4_LEN + 7), None);
        let fits = udp_frame(100, 0);
        assert_eq!(fragment(&fits, 1400), Some(vec![fits]));
        for n in 0..40 {
            let _ = fragment(&udp_frame(100, 0)[..n], 50);
        }
    }

    /// Found by the fuzzer (router/fuzz, target icmp_fragment): a fragment whose offset plus
    /// length runs past 64 KiB made pieces whose offsets wrapped around to the start.
    #[test]
    fn refuses_a_fragment_that_ends_past_64k_instead_of_wrapping() {
        let frame = udp_frame(3000, 0x1ff0);
        assert_eq!(fragment(&frame, 1400), None);
        // The highest offsets that still fit are cut as usual.
        let base = 0x1ff0 * 8;
        let len = usize::from(u16::MAX) - IPV4_LEN - base;
        let frame = udp_frame(len, 0x1ff0);
        let pieces = fragment(&frame, 60).expect("pieces");
        let (payload, last_mf) = reassemble(&pieces);
        assert_eq!(payload[base..], frame[ETH_LEN + IPV4_LEN..]);
        assert!(!last_mf);
    }

    proptest! {
        /// Pieces fit, reassemble to the original payload, and a fragment of a fragment keeps
        /// its place (offsets added, MF kept on the last piece).
        #[test]
        fn pieces_reassemble(len in 1usize..9000, limit in 60usize..2000, first_offset in 0u16..100, more in any::<bool>()) {
            let flags = first_offset | if more { IP_MF } else { 0 };
            let frame = udp_frame(len, flags);
            let pieces = fragment(&frame, limit).expect("pieces");
            prop_assert!(pieces.iter().all(|p| p.len() <= limit));
            let (payload, last_mf) = reassemble(&pieces);
            let base = usize::from(first_offset) * 8;
            prop_assert_eq!(&payload[base..], &frame[ETH_LEN + IPV4_LEN..]);
            prop_assert_eq!(last_mf, more);
        }
    }
}
