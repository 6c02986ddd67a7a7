//! The Internet checksum (RFC 1071), for the IPv4, TCP and ICMP headers the router checks or
//! writes itself (pure).

/// Ones'-complement sum of `data` as big-endian 16-bit words (odd length padded with zero),
/// added to `initial`; unfolded.
pub fn sum(data: &[u8], initial: u64) -> u64 {
    let mut acc = initial;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let word = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        // Add the two 32-bit halves so the 64-bit accumulator cannot overflow.
        acc += word >> 32;
        acc += word & 0xffff_ffff;
    }
    let mut rest = chunks.remainder().chunks_exact(2);
    for c in &mut rest {
        acc += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = rest.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Fold an unfolded sum to 16 bits.
pub fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to 0x2ddf0, folded 0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&data, 0)), 0xddf2);
        // Word by word or eight bytes at a time, and an odd tail padded with zero.
        assert_eq!(
            fold(sum(&data[..6], 0)),
            fold(sum(&data[..2], 0) + sum(&data[2..6], 0))
        );
        assert_eq!(fold(sum(&[0xab], 0)), 0xab00);
    }
}
