//! ICMP "fragmentation needed" for frames too big for a peer's path (pure; spec router §4.8).
//!
//! A container sends IPv4 with DF set and sizes its packets by the weave interface's MTU. When
//! the path to a peer carries less (a smaller underlay MTU, found by PMTU discovery), such a
//! frame can neither be sent whole nor be fragmented. Dropping it silently would stall TCP for
//! good; instead the router answers the sender as a router on the path would: ICMP type 3
//! code 4 with the MTU that fits, so the sender's kernel lowers its path MTU and resends.
//!
//! Replies are rate limited ([`RateLimiter`], as kernels do for the ICMP errors they send): a
//! sender of oversized frames must not turn the router into an amplifier.

use std::time::{Duration, Instant};

use crate::checksum::{fold, sum};

const ETH_LEN: usize = 14;
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const IPV4_MIN_LEN: usize = 20;
const IP_PROTO_ICMP: u8 = 1;
const IP_DF: u8 = 0x40;
const ICMP_HEADER_LEN: usize = 8;
const ICMP_DEST_UNREACHABLE: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
/// Bytes of the offending packet's payload quoted after its IP header (RFC 792).
const QUOTED_PAYLOAD: usize = 8;
const TTL: u8 = 64;

/// ICMP replies per second the router generates, in the long run.
pub const ICMP_RATE: u32 = 100;
/// ICMP replies allowed in a burst.
pub const ICMP_BURST: u32 = 20;

/// A token bucket: `rate` tokens a second, at most `burst` saved up. Pure: time is passed in.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    /// Time per token.
    period: Duration,
    burst: u32,
    tokens: u32,
    /// When `tokens` was last topped up (tokens accrue from here).
    since: Instant,
    limited: u64,
}

impl RateLimiter {
    /// Starts full.
    pub fn new(now: Instant, rate: u32, burst: u32) -> Self {
        RateLimiter {
            period: Duration::from_secs(1) / rate.max(1),
            burst: burst.max(1),
            tokens: burst.max(1),
            since: now,
            limited: 0,
        }
    }

    /// The default for ICMP replies ([`ICMP_RATE`], [`ICMP_BURST`]).
    pub fn icmp(now: Instant) -> Self {
        RateLimiter::new(now, ICMP_RATE, ICMP_BURST)
    }

    /// Take a token if there is one; false (and counted) otherwise.
    pub fn allow(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.since);
        let earned = elapsed.as_nanos() / self.period.as_nanos().max(1);
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            self.tokens = self.tokens.saturating_add(earned).min(self.burst);
            // Keep the remainder of a partly earned token.
            self.since = if self.tokens == self.burst {
                now
            } else {
                self.since + self.period * earned
            };
        }
        if self.tokens == 0 {
            self.limited += 1;
            return false;
        }
        self.tokens -= 1;
        true
    }

    /// Requests refused so far.
    pub fn limited(&self) -> u64 {
        self.limited
    }
}

/// Does `frame` carry IPv4 with the DF bit set?
pub fn ipv4_df(frame: &[u8]) -> bool {
    frame.get(12..14) == Some(&ETHERTYPE_IPV4)
        && frame.get(ETH_LEN + 6).is_some_and(|b| b & IP_DF != 0)
}

/// The Ethernet frame answering `frame` (IPv4 with DF) with "fragmentation needed, next-hop
/// MTU `mtu`": addresses swapped at both layers, the offending IP header and 8 bytes of its
/// payload quoted. `None` for anything that must not be answered: not IPv4, malformed, a
/// fragment other than the first, or itself an ICMP error (RFC 1122 §3.2.2).
pub fn frag_needed(frame: &[u8], mtu: u16) -> Option<Vec<u8>> {
    if frame.get(12..14)? != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = frame.get(ETH_LEN..)?;
    let header_len = usize::from(ip.first()? & 0x0f) * 4;
    if ip.first()? >> 4 != 4 || header_len < IPV4_MIN_LEN || ip.len() < header_len {
        return None;
    }
    let fragment_offset = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
    if fragment_offset != 0 {
        return None;
    }
    let total_len = usize::from(u16::from_be_bytes([ip[2], ip[3]])).clamp(header_len, ip.len());
    let quoted = &ip[..total_len.min(header_len + QUOTED_PAYLOAD)];
    if ip[9] == IP_PROTO_ICMP {
        // Only echo request/reply and other queries may be answered with an error.
        let icmp_type = *quoted.get(header_len)?;
        if !matches!(icmp_type, 0 | 8 | 13 | 14 | 15 | 16 | 17 | 18) {
            return None;
        }
    }

    let ip_len = IPV4_MIN_LEN + ICMP_HEADER_LEN + quoted.len();
    let mut out = Vec::with_capacity(ETH_LEN + ip_len);
    out.extend_from_slice(&frame[6..12]);
    out.extend_from_slice(&frame[0..6]);
    out.extend_from_slice(&ETHERTYPE_IPV4);
    // IPv4 header: no options, DSCP 0, id 0, no flags, TTL 64, ICMP.
    out.extend_from_slice(&[0x45, 0]);
    out.extend_from_slice(&(ip_len as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0, TTL, IP_PROTO_ICMP, 0, 0]);
    out.extend_from_slice(&ip[16..20]); // from the original destination
    out.extend_from_slice(&ip[12..16]); // to the original source
    let ip_sum = !fold(sum(&out[ETH_LEN..ETH_LEN + IPV4_MIN_LEN], 0));
    out[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&ip_sum.to_be_bytes());
    // ICMP: type, code, checksum, unused, next-hop MTU, quoted packet.
    let icmp_start = out.len();
    out.extend_from_slice(&[ICMP_DEST_UNREACHABLE, ICMP_FRAG_NEEDED, 0, 0, 0, 0]);
    out.extend_from_slice(&mtu.to_be_bytes());
    out.extend_from_slice(quoted);
    let icmp_sum = !fold(sum(&out[icmp_start..], 0));
    out[icmp_start + 2..icmp_start + 4].copy_from_slice(&icmp_sum.to_be_bytes());
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limiter_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut r = RateLimiter::icmp(t0);
        let allowed = (0..100).filter(|_| r.allow(t0)).count();
        assert_eq!(allowed, ICMP_BURST as usize);
        assert_eq!(r.limited(), 100 - u64::from(ICMP_BURST));
        // 100/s: one token every 10 ms, none before.
        assert!(!r.allow(t0 + Duration::from_millis(9)));
        assert!(r.allow(t0 + Duration::from_millis(10)));
        assert!(!r.allow(t0 + Duration::from_millis(15)));
        // Partly earned tokens are kept: at 20 ms the second one is complete.
        assert!(r.allow(t0 + Duration::from_millis(20)));
        // Over ten seconds of a flood every millisecond: about rate * 10 get through.
        let mut r = RateLimiter::icmp(t0);
        let mut ok = 0;
        for ms in 0..10_000u64 {
            for _ in 0..5 {
                ok += usize::from(r.allow(t0 + Duration::from_millis(ms)));
            }
        }
        assert!((1000..=1000 + ICMP_BURST as usize).contains(&ok), "{ok}");
        // Idle refills only up to the burst.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(
            (0..50).filter(|_| r.allow(later)).count(),
            ICMP_BURST as usize
        );
    }

    /// An Ethernet + IPv4 frame (DF set) of protocol `proto` carrying `payload`.
    fn ipv4(proto: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
        let total = (IPV4_MIN_LEN + payload.len()) as u16;
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&[0x12, 0x34, IP_DF, 0, 63, proto, 0, 0]);
        f.extend_from_slice(&[10, 35, 1, 2, 10, 35, 1, 1]);
        let ip_sum = !fold(sum(&f[ETH_LEN..], 0));
        f[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&ip_sum.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn answers_a_big_tcp_segment() {
        let payload: Vec<u8> = (0..1400u32).map(|i| i as u8).collect();
        let frame = ipv4(6, &payload);
        assert!(ipv4_df(&frame));
        let reply = frag_needed(&frame, 1310).expect("a reply");
        // Ethernet and IP addresses swapped.
        assert_eq!(reply[..6], frame[6..12]);
        assert_eq!(reply[6..12], frame[..6]);
        assert_eq!(reply[ETH_LEN + 12..ETH_LEN + 16], [10, 35, 1, 1]);
        assert_eq!(reply[ETH_LEN + 16..ETH_LEN + 20], [10, 35, 1, 2]);
        assert_eq!(reply[ETH_LEN + 9], IP_PROTO_ICMP);
        assert_eq!(reply[ETH_LEN + 8], TTL);
        // Both checksums verify.
        assert_eq!(fold(sum(&reply[ETH_LEN..ETH_LEN + 20], 0)), 0xffff);
        let icmp = &reply[ETH_LEN + 20..];
        assert_eq!(fold(sum(icmp, 0)), 0xffff);
        assert_eq!(icmp[..2], [3, 4]);
        assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1310);
        // The offending header plus 8 bytes of its payload.
        assert_eq!(icmp[8..], frame[ETH_LEN..ETH_LEN + 28]);
        let total = u16::from_be_bytes([reply[ETH_LEN + 2], reply[ETH_LEN + 3]]);
        assert_eq!(usize::from(total), reply.len() - ETH_LEN);
    }

    #[test]
    fn never_answers_errors_fragments_or_non_ip() {
        // An ICMP error (destination unreachable) is not answered; an echo request is.
        assert_eq!(
            frag_needed(&ipv4(1, &[3, 1, 0, 0, 0, 0, 0, 0, 1]), 1000),
            None
        );
        assert!(frag_needed(&ipv4(1, &[8, 0, 0, 0, 0, 0, 0, 0, 1]), 1000).is_some());
        let mut fragment = ipv4(17, &[0; 100]);
        fragment[ETH_LEN + 7] = 0x10; // offset 16 × 8
        assert_eq!(frag_needed(&fragment, 1000), None);
        let mut arp = ipv4(6, &[0; 40]);
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(frag_needed(&arp, 1000), None);
        assert!(!ipv4_df(&arp));
        for n in 0..40 {
            // Truncated input never panics.
            let _ = frag_needed(&ipv4(6, &[0; 20])[..n], 1000);
        }
    }

    #[test]
    fn short_packets_quote_what_there_is() {
        let frame = ipv4(17, &[1, 2, 3]);
        let reply = frag_needed(&frame, 576).expect("a reply");
        assert_eq!(reply[ETH_LEN + 28..], frame[ETH_LEN..]);
    }
}
