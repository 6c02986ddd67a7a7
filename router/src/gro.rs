//! Receive coalescing (software GRO) for the frames the sleeve injects into the bridge (pure).
//!
//! A fast TCP flow arrives from a peer as one frame per MTU-sized segment. Injecting each on
//! its own makes the kernel run the bridge and the receiving container's TCP stack once per
//! segment, which is most of the receive side's cost. The [`Coalescer`] merges consecutive
//! segments of one IPv4 TCP flow that arrive in the same batch into one large frame, the way the
//! kernel's GRO would on a real NIC; the injector hands it to the kernel with a virtio-net
//! header ([`GsoInfo::vnet_header`]) that marks it as a TCP segmentation-offload frame with a
//! partial checksum. The container then receives one socket buffer instead of dozens, and if
//! the frame has to leave through a real interface the kernel segments it again.
//!
//! Merging follows the kernel's own GRO rules, so a merged frame re-segments into exactly the
//! original segments: same flow, MACs, TOS, TTL and DF set; no IP options or fragments; only
//! ACK (and PSH on the last segment) among the TCP flags; identical ACK number, window and
//! options; consecutive sequence numbers; every segment but the last the size of the first.
//! Each segment's IP and TCP checksums are verified before it is merged, because the merged
//! frame's checksum is left for the kernel to trust rather than to check. Everything else
//! passes through unchanged, in order: a frame that cannot be merged closes its flow's open
//! frame so that later segments never overtake it.

use crate::checksum::{fold, sum};

/// Length of `struct virtio_net_hdr` (linux/virtio_net.h), which precedes every frame written
/// to a packet socket with `PACKET_VNET_HDR`.
pub const VNET_HDR_LEN: usize = 10;
/// The virtio-net header of a frame that needs nothing from the kernel.
pub const PLAIN_VNET_HDR: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];

const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;

const ETH_LEN: usize = 14;
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const IPV4_LEN: usize = 20;
const IP_PROTO_TCP: u8 = 6;
const IP_DF: u16 = 0x4000;
/// More-fragments flag and fragment offset.
const IP_FRAGMENT_BITS: u16 = 0x3fff;
const TCP_MIN_LEN: usize = 20;
const TCP_CHECKSUM_OFFSET: usize = 16;
const TCP_FLAG_PSH: u8 = 0x08;
const TCP_FLAG_ACK: u8 = 0x10;
/// The largest merged IPv4 packet (the total-length field).
const MAX_IP_LEN: usize = 0xffff;
/// Most segments merged into one frame (the kernel's GRO limit).
const MAX_SEGMENTS: u16 = 64;

/// What the kernel needs to know about a merged frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GsoInfo {
    /// Payload bytes per segment (all but the last segment carry exactly this much).
    pub gso_size: u16,
    /// Ethernet + IP + TCP header length.
    pub hdr_len: u16,
    /// Where checksumming starts (the TCP header), from the start of the frame.
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
}

impl GsoInfo {
    /// The `struct virtio_net_hdr` for this frame, in host byte order (packet sockets use the
    /// host's order for virtio 1.0 headers).
    pub fn vnet_header(&self) -> [u8; VNET_HDR_LEN] {
        let mut h = [0u8; VNET_HDR_LEN];
        h[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        h[1] = VIRTIO_NET_HDR_GSO_TCPV4;
        h[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        h[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        h[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        h[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        h
    }
}

/// One frame ready for injection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coalesced<'a> {
    pub frame: &'a [u8],
    /// `Some` for a merged frame of two or more segments.
    pub gso: Option<GsoInfo>,
}

/// Counters for `weave report` and the benchmark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CoalesceStats {
    /// Frames pushed.
    pub frames_in: u64,
    /// Frames handed out (merged or not).
    pub frames_out: u64,
    /// TCP segments not merged because a checksum was wrong (passed on unchanged).
    pub bad_checksum: u64,
}

/// Identity of a TCP flow as far as merging goes: both MACs, both IPs, both ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FlowKey {
    macs: [u8; 12],
    ips: [u8; 8],
    ports: [u8; 4],
}

/// A parsed IPv4 TCP segment (offsets into its frame).
#[derive(Debug, Clone, Copy)]
struct Segment {
    key: FlowKey,
    seq: u32,
    /// Ethernet + IP + TCP header length.
    hdr_len: usize,
    /// TCP header length.
    tcp_len: usize,
    payload: usize,
    psh: bool,
    /// Header checks passed, flags and size allow merging.
    mergeable: bool,
}

/// An output frame being built.
#[derive(Debug)]
struct Group {
    buf: Vec<u8>,
    /// The flow, while more segments may still be merged in.
    open: Option<FlowKey>,
    segments: u16,
    gso_size: usize,
    hdr_len: usize,
    tcp_len: usize,
    next_seq: u32,
    psh: bool,
}

/// Merges consecutive TCP segments of a batch; see the module documentation.
#[derive(Debug, Default)]
pub struct Coalescer {
    /// Off: every frame passes through on its own.
    disabled: bool,
    groups: Vec<Group>,
    /// Buffers of drained groups, reused.
    spare: Vec<Vec<u8>>,
    stats: CoalesceStats,
}

impl Coalescer {
    pub fn new() -> Self {
        Coalescer::default()
    }

    /// Stop merging (for good): when the kernel refuses merged frames, frames on their own
    /// still get through.
    pub fn disable(&mut self) {
        self.disabled = true;
    }

    pub fn stats(&self) -> CoalesceStats {
        self.stats
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Add a frame (copied). Frames come out of [`Coalescer::drain`] in the order they went
    /// in, except that segments merged into an earlier frame of their flow move up with it.
    pub fn push(&mut self, frame: &[u8]) {
        self.stats.frames_in += 1;
        if self.disabled {
            self.push_alone(frame, None);
            return;
        }
        let Some(seg) = parse_tcp(frame) else {
            self.push_alone(frame, None);
            return;
        };
        let seg = if seg.mergeable && !segment_checksums_ok(frame, &seg) {
            self.stats.bad_checksum += 1;
            Segment {
                mergeable: false,
                ..seg
            }
        } else {
            seg
        };
        let open = self
            .groups
            .iter_mut()
            .rev()
            .find(|g| g.open == Some(seg.key));
        if let Some(group) = open {
            if seg.mergeable && group.accepts(frame, &seg) {
                group.append(frame, &seg);
                return;
            }
            group.open = None;
        }
        self.push_alone(frame, seg.mergeable.then_some(&seg));
    }

    /// Start a new output frame with `frame`; `seg` when later segments may merge into it.
    fn push_alone(&mut self, frame: &[u8], seg: Option<&Segment>) {
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(frame);
        let group = match seg {
            Some(seg) => {
                // Drop Ethernet padding so payloads can be appended.
                buf.truncate(seg.hdr_len + seg.payload);
                Group {
                    buf,
                    open: (!seg.psh).then_some(seg.key),
                    segments: 1,
                    gso_size: seg.payload,
                    hdr_len: seg.hdr_len,
                    tcp_len: seg.tcp_len,
                    next_seq: seg.seq.wrapping_add(seg.payload as u32),
                    psh: seg.psh,
                }
            }
            None => Group {
                buf,
                open: None,
                segments: 1,
                gso_size: 0,
                hdr_len: 0,
                tcp_len: 0,
                next_seq: 0,
                psh: false,
            },
        };
        self.groups.push(group);
    }

    /// Finish every frame and hand them out in order; the coalescer is empty afterwards.
    pub fn drain(&mut self) -> Drain<'_> {
        for group in &mut self.groups {
            group.finish();
        }
        self.stats.frames_out += self.groups.len() as u64;
        Drain {
            coalescer: self,
            next: 0,
        }
    }
}

/// Iterator returned by [`Coalescer::drain`]; recycles the buffers when dropped.
pub struct Drain<'a> {
    coalescer: &'a mut Coalescer,
    next: usize,
}

impl Drain<'_> {
    /// The next frame. (Not `Iterator`: each frame borrows the drain.)
    pub fn next_frame(&mut self) -> Option<Coalesced<'_>> {
        let group = self.coalescer.groups.get(self.next)?;
        self.next += 1;
        Some(Coalesced {
            frame: &group.buf,
            gso: (group.segments > 1).then_some(GsoInfo {
                gso_size: group.gso_size as u16,
                hdr_len: group.hdr_len as u16,
                csum_start: (ETH_LEN + IPV4_LEN) as u16,
                csum_offset: TCP_CHECKSUM_OFFSET as u16,
            }),
        })
    }
}

impl Drop for Drain<'_> {
    fn drop(&mut self) {
        let c = &mut *self.coalescer;
        c.spare.extend(c.groups.drain(..).map(|g| g.buf));
    }
}

impl Group {
    /// May `seg` (of this group's flow) be appended?
    fn accepts(&self, frame: &[u8], seg: &Segment) -> bool {
        seg.seq == self.next_seq
            && seg.payload <= self.gso_size
            && seg.tcp_len == self.tcp_len
            && self.segments < MAX_SEGMENTS
            && self.buf.len() - ETH_LEN + seg.payload <= MAX_IP_LEN
            && same_headers(&self.buf, frame, self.tcp_len)
    }

    fn append(&mut self, frame: &[u8], seg: &Segment) {
        self.buf
            .extend_from_slice(&frame[seg.hdr_len..seg.hdr_len + seg.payload]);
        self.segments += 1;
        self.next_seq = seg.seq.wrapping_add(seg.payload as u32);
        self.psh |= seg.psh;
        // A short segment or PSH ends the run, as in the kernel.
        if seg.payload < self.gso_size || seg.psh {
            self.open = None;
        }
    }

    /// Fix up the headers of a merged frame: lengths, PSH, IP checksum, and the TCP checksum
    /// field set to the pseudo-header sum the kernel expects with `NEEDS_CSUM`.
    fn finish(&mut self) {
        if self.segments < 2 {
            return;
        }
        let ip_len = self.buf.len() - ETH_LEN;
        let tcp_start = ETH_LEN + IPV4_LEN;
        let buf = &mut self.buf;
        buf[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&(ip_len as u16).to_be_bytes());
        buf[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&[0, 0]);
        let ip_sum = !fold(sum(&buf[ETH_LEN..tcp_start], 0));
        buf[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&ip_sum.to_be_bytes());
        if self.psh {
            buf[tcp_start + 13] |= TCP_FLAG_PSH;
        }
        let pseudo = pseudo_header_sum(buf, ip_len - IPV4_LEN);
        let at = tcp_start + TCP_CHECKSUM_OFFSET;
        buf[at..at + 2].copy_from_slice(&fold(pseudo).to_be_bytes());
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Parse `frame` as Ethernet + IPv4 + TCP; `None` for anything else (or anything malformed).
fn parse_tcp(frame: &[u8]) -> Option<Segment> {
    if frame.get(12..14)? != ETHERTYPE_IPV4 || frame.len() < ETH_LEN + IPV4_LEN {
        return None;
    }
    let ip = &frame[ETH_LEN..];
    if ip[9] != IP_PROTO_TCP {
        return None;
    }
    let ip_len = usize::from(be16(ip, 2));
    let tcp = ip.get(IPV4_LEN..ip_len.max(IPV4_LEN))?;
    let tcp_len = usize::from(tcp.get(12)? >> 4) * 4;
    let options_ok = ip[0] == 0x45;
    let fragment = be16(ip, 6);
    if tcp.len() < TCP_MIN_LEN.max(tcp_len) || !options_ok {
        // Not a segment we can take apart; TCP or not, it just passes through.
        return None;
    }
    let mut key = FlowKey {
        macs: [0; 12],
        ips: [0; 8],
        ports: [0; 4],
    };
    key.macs.copy_from_slice(&frame[..12]);
    key.ips.copy_from_slice(&ip[12..20]);
    key.ports.copy_from_slice(&tcp[..4]);
    let flags = tcp[13];
    let payload = tcp.len() - tcp_len;
    let mergeable = payload > 0
        && tcp_len >= TCP_MIN_LEN
        && fragment & IP_FRAGMENT_BITS == 0
        && fragment & IP_DF != 0
        && flags & !(TCP_FLAG_ACK | TCP_FLAG_PSH) == 0
        && flags & TCP_FLAG_ACK != 0;
    Some(Segment {
        key,
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        hdr_len: ETH_LEN + IPV4_LEN + tcp_len,
        tcp_len,
        payload,
        psh: flags & TCP_FLAG_PSH != 0,
        mergeable,
    })
}

/// Do the fields that must match between merged segments match? (Both frames parsed as
/// mergeable segments of the same flow with the same TCP header length.)
fn same_headers(first: &[u8], next: &[u8], tcp_len: usize) -> bool {
    let (a, b) = (&first[ETH_LEN..], &next[ETH_LEN..]);
    // TOS; DF (fragment bits already checked); TTL.
    let ip_same = a[1] == b[1] && a[6] == b[6] && a[8] == b[8];
    let (ta, tb) = (&a[IPV4_LEN..], &b[IPV4_LEN..]);
    let flags_same = (ta[13] ^ tb[13]) & !TCP_FLAG_PSH == 0;
    ip_same
        && ta[8..12] == tb[8..12] // ACK number
        && ta[12] == tb[12] // data offset
        && flags_same
        && ta[14..16] == tb[14..16] // window
        && ta[18..tcp_len] == tb[18..tcp_len] // urgent pointer, options
}

/// Are the IPv4 header checksum and the TCP checksum of this segment right?
fn segment_checksums_ok(frame: &[u8], seg: &Segment) -> bool {
    let ip = &frame[ETH_LEN..ETH_LEN + IPV4_LEN];
    if fold(sum(ip, 0)) != 0xffff {
        return false;
    }
    let tcp = &frame[ETH_LEN + IPV4_LEN..seg.hdr_len + seg.payload];
    fold(sum(tcp, pseudo_header_sum(frame, tcp.len()))) == 0xffff
}

/// Unfolded sum of the IPv4 pseudo-header of `frame`'s TCP segment of `tcp_len` bytes.
fn pseudo_header_sum(frame: &[u8], tcp_len: usize) -> u64 {
    let ip = &frame[ETH_LEN..];
    sum(&ip[12..20], u64::from(IP_PROTO_TCP) + tcp_len as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];

    struct Tcp {
        src_port: u16,
        seq: u32,
        flags: u8,
        df: bool,
        options: Vec<u8>,
        payload: Vec<u8>,
    }

    impl Tcp {
        fn data(src_port: u16, seq: u32, payload: Vec<u8>) -> Tcp {
            Tcp {
                src_port,
                seq,
                flags: TCP_FLAG_ACK,
                df: true,
                options: vec![1, 1, 8, 10, 0, 0, 0, 7, 0, 0, 0, 9], // NOP NOP timestamps
                payload,
            }
        }

        /// A frame with correct checksums.
        fn frame(&self) -> Vec<u8> {
            let tcp_len = TCP_MIN_LEN + self.options.len();
            let ip_len = IPV4_LEN + tcp_len + self.payload.len();
            let mut f = Vec::new();
            f.extend_from_slice(&MAC_B);
            f.extend_from_slice(&MAC_A);
            f.extend_from_slice(&ETHERTYPE_IPV4);
            f.extend_from_slice(&[0x45, 0]);
            f.extend_from_slice(&(ip_len as u16).to_be_bytes());
            f.extend_from_slice(&[0x12, 0x34]);
            f.extend_from_slice(&(if self.df { IP_DF } else { 0 }).to_be_bytes());
            f.extend_from_slice(&[64, IP_PROTO_TCP, 0, 0]);
            f.extend_from_slice(&[10, 35, 1, 2, 10, 35, 1, 1]);
            f.extend_from_slice(&self.src_port.to_be_bytes());
            f.extend_from_slice(&5201u16.to_be_bytes());
            f.extend_from_slice(&self.seq.to_be_bytes());
            f.extend_from_slice(&77u32.to_be_bytes());
            f.extend_from_slice(&[
                ((tcp_len / 4) as u8) << 4,
                self.flags,
                0x01,
                0xf5,
                0,
                0,
                0,
                0,
            ]);
            f.extend_from_slice(&self.options);
            f.extend_from_slice(&self.payload);
            let ip_sum = !fold(sum(&f[ETH_LEN..ETH_LEN + IPV4_LEN], 0));
            f[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&ip_sum.to_be_bytes());
            let tcp_sum = !fold(sum(
                &f[ETH_LEN + IPV4_LEN..],
                pseudo_header_sum(&f, tcp_len + self.payload.len()),
            ));
            let at = ETH_LEN + IPV4_LEN + TCP_CHECKSUM_OFFSET;
            f[at..at + 2].copy_from_slice(&tcp_sum.to_be_bytes());
            f
        }
    }

    fn arp() -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&MAC_A);
        f.extend_from_slice(&[0x08, 0x06]);
        f.resize(60, 0);
        f
    }

    fn drain_all(c: &mut Coalescer) -> Vec<(Vec<u8>, Option<GsoInfo>)> {
        let mut out = Vec::new();
        let mut d = c.drain();
        while let Some(x) = d.next_frame() {
            out.push((x.frame.to_vec(), x.gso));
        }
        out
    }

    /// What the kernel does with a merged frame: cut it back into segments with full
    /// checksums (the reference the merge must be undone by).
    fn resegment(frame: &[u8], gso: Option<GsoInfo>) -> Vec<Vec<u8>> {
        let Some(gso) = gso else {
            return vec![frame.to_vec()];
        };
        let hdr = usize::from(gso.hdr_len);
        let payload = &frame[hdr..];
        let last = payload.len().div_ceil(usize::from(gso.gso_size));
        let seq0 = u32::from_be_bytes(
            frame[ETH_LEN + IPV4_LEN + 4..ETH_LEN + IPV4_LEN + 8]
                .try_into()
                .unwrap(),
        );
        let psh = frame[ETH_LEN + IPV4_LEN + 13] & TCP_FLAG_PSH != 0;
        payload
            .chunks(usize::from(gso.gso_size))
            .enumerate()
            .map(|(i, chunk)| {
                let mut f = frame[..hdr].to_vec();
                f.extend_from_slice(chunk);
                let ip_len = (f.len() - ETH_LEN) as u16;
                f[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&ip_len.to_be_bytes());
                f[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&[0, 0]);
                let ip_sum = !fold(sum(&f[ETH_LEN..ETH_LEN + IPV4_LEN], 0));
                f[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&ip_sum.to_be_bytes());
                let t = ETH_LEN + IPV4_LEN;
                let seq = seq0.wrapping_add((i * usize::from(gso.gso_size)) as u32);
                f[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
                if !(psh && i + 1 == last) {
                    f[t + 13] &= !TCP_FLAG_PSH;
                }
                f[t + 16..t + 18].copy_from_slice(&[0, 0]);
                let tcp_sum = !fold(sum(&f[t..], pseudo_header_sum(&f, f.len() - t)));
                f[t + 16..t + 18].copy_from_slice(&tcp_sum.to_be_bytes());
                f
            })
            .collect()
    }

    #[test]
    fn merges_a_run_of_segments() {
        let mut c = Coalescer::new();
        let segs: Vec<Vec<u8>> = (0..5u32)
            .map(|i| Tcp::data(40000, 1000 + i * 100, vec![i as u8; 100]).frame())
            .collect();
        for s in &segs {
            c.push(s);
        }
        let out = drain_all(&mut c);
        assert_eq!(out.len(), 1);
        let (frame, gso) = &out[0];
        let gso = gso.unwrap();
        assert_eq!(gso.gso_size, 100);
        assert_eq!(usize::from(gso.hdr_len), ETH_LEN + IPV4_LEN + 32);
        assert_eq!(frame.len(), usize::from(gso.hdr_len) + 500);
        // The checksum field holds the pseudo-header sum over the whole segment.
        let t = ETH_LEN + IPV4_LEN;
        let field = be16(frame, t + TCP_CHECKSUM_OFFSET);
        assert_eq!(field, fold(pseudo_header_sum(frame, frame.len() - t)));
        assert_eq!(fold(sum(&frame[ETH_LEN..t], 0)), 0xffff, "IP checksum");
        assert_eq!(resegment(frame, Some(gso)), segs);
        assert_eq!(c.stats().frames_in, 5);
        assert_eq!(c.stats().frames_out, 1);
    }

    #[test]
    fn disabled_passes_everything_through() {
        let mut c = Coalescer::new();
        c.disable();
        let segs: Vec<Vec<u8>> = (0..3u32)
            .map(|i| Tcp::data(1, i * 100, vec![1; 100]).frame())
            .collect();
        for s in &segs {
            c.push(s);
        }
        let out = drain_all(&mut c);
        assert_eq!(out.iter().map(|(f, _)| f.clone()).collect::<Vec<_>>(), segs);
        assert!(out.iter().all(|(_, g)| g.is_none()));
    }

    #[test]
    fn vnet_header_layout() {
        let gso = GsoInfo {
            gso_size: 1324,
            hdr_len: 66,
            csum_start: 34,
            csum_offset: 16,
        };
        let h = gso.vnet_header();
        assert_eq!(h[0], VIRTIO_NET_HDR_F_NEEDS_CSUM);
        assert_eq!(h[1], VIRTIO_NET_HDR_GSO_TCPV4);
        assert_eq!(u16::from_ne_bytes([h[2], h[3]]), 66);
        assert_eq!(u16::from_ne_bytes([h[4], h[5]]), 1324);
        assert_eq!(u16::from_ne_bytes([h[6], h[7]]), 34);
        assert_eq!(u16::from_ne_bytes([h[8], h[9]]), 16);
    }

    #[test]
    fn passes_through_what_it_cannot_merge() {
        let mut c = Coalescer::new();
        let mut syn = Tcp::data(40000, 1, Vec::new());
        syn.flags = 0x02;
        let mut no_df = Tcp::data(40001, 1, vec![1; 10]);
        no_df.df = false;
        let mut corrupt = Tcp::data(40002, 1, vec![1; 10]).frame();
        *corrupt.last_mut().unwrap() ^= 1;
        let inputs = vec![arp(), syn.frame(), no_df.frame(), corrupt, vec![1, 2, 3]];
        for f in &inputs {
            c.push(f);
        }
        let out = drain_all(&mut c);
        assert_eq!(
            out.iter().map(|(f, _)| f.clone()).collect::<Vec<_>>(),
            inputs
        );
        assert!(out.iter().all(|(_, g)| g.is_none()));
        assert_eq!(c.stats().bad_checksum, 1);
    }

    #[test]
    fn a_gap_a_short_segment_or_psh_ends_a_run() {
        let mut c = Coalescer::new();
        let a = Tcp::data(1, 0, vec![1; 100]).frame();
        let b = Tcp::data(1, 100, vec![2; 60]).frame(); // short: ends the run
        let c1 = Tcp::data(1, 160, vec![3; 100]).frame();
        let gap = Tcp::data(1, 400, vec![4; 100]).frame();
        let mut psh = Tcp::data(1, 500, vec![5; 100]);
        psh.flags |= TCP_FLAG_PSH;
        let after = Tcp::data(1, 600, vec![6; 100]).frame();
        for f in [&a, &b, &c1, &gap, &psh.frame(), &after] {
            c.push(f);
        }
        let out = drain_all(&mut c);
        let sizes: Vec<usize> = out
            .iter()
            .map(|(f, _)| f.len() - (ETH_LEN + IPV4_LEN + 32))
            .collect();
        assert_eq!(sizes, vec![160, 100, 200, 100]);
        assert!(out[2].1.is_some());
        let t = ETH_LEN + IPV4_LEN;
        assert_ne!(out[2].0[t + 13] & TCP_FLAG_PSH, 0);
    }

    #[test]
    fn a_pure_ack_of_the_flow_is_not_overtaken() {
        let mut c = Coalescer::new();
        let a = Tcp::data(1, 0, vec![1; 100]).frame();
        let ack = Tcp::data(1, 100, Vec::new()).frame();
        let b = Tcp::data(1, 100, vec![2; 100]).frame();
        for f in [&a, &ack, &b] {
            c.push(f);
        }
        let out: Vec<Vec<u8>> = drain_all(&mut c).into_iter().map(|(f, _)| f).collect();
        assert_eq!(out, vec![a, ack, b]);
    }

    #[test]
    fn different_options_do_not_merge() {
        let mut c = Coalescer::new();
        let a = Tcp::data(1, 0, vec![1; 100]).frame();
        let mut later = Tcp::data(1, 100, vec![2; 100]);
        later.options[7] = 8; // newer timestamp
        c.push(&a);
        c.push(&later.frame());
        assert_eq!(drain_all(&mut c).len(), 2);
    }

    #[test]
    fn padding_is_dropped_before_merging() {
        let mut c = Coalescer::new();
        let bare = |seq, payload| Tcp {
            options: Vec::new(),
            ..Tcp::data(1, seq, payload)
        };
        let unpadded = bare(0, vec![1; 4]).frame();
        assert_eq!(unpadded.len(), 58);
        let mut a = unpadded.clone();
        a.resize(60, 0);
        let b = bare(4, vec![2; 4]).frame();
        c.push(&a);
        c.push(&b);
        let out = drain_all(&mut c);
        assert_eq!(out.len(), 1);
        assert_eq!(resegment(&out[0].0, out[0].1), vec![unpadded, b]);
    }

    #[test]
    fn merged_frames_stay_under_the_ip_limit() {
        let mut c = Coalescer::new();
        for i in 0..60u32 {
            c.push(&Tcp::data(1, i * 1400, vec![0; 1400]).frame());
        }
        let out = drain_all(&mut c);
        assert!(out.len() >= 2);
        assert!(out.iter().all(|(f, _)| f.len() - ETH_LEN <= MAX_IP_LEN));
    }

    proptest! {
        /// Garbage, and valid segments with bytes flipped or cut short, never panic and
        /// always come out (merged or not).
        #[test]
        fn any_input_is_safe(
            frames in proptest::collection::vec(
                (any::<bool>(), proptest::collection::vec(any::<u8>(), 0..120), any::<usize>(), any::<u8>()),
                1..20,
            ),
        ) {
            let mut c = Coalescer::new();
            for (i, (garbage, bytes, at, flip)) in frames.iter().enumerate() {
                let frame = if *garbage {
                    bytes.clone()
                } else {
                    let mut f = Tcp::data(1, (i * 100) as u32, vec![7; 100]).frame();
                    let at = at % f.len();
                    f[at] ^= flip;
                    f.truncate(f.len() - at % 3);
                    f
                };
                c.push(&frame);
            }
            let out = drain_all(&mut c);
            prop_assert!(!out.is_empty());
        }

        /// Whatever the mix of flows, segment sizes and other frames, re-segmenting the
        /// output gives back each flow's segments in order, and other frames unchanged.
        #[test]
        fn merging_is_undone_by_segmentation(
            plan in proptest::collection::vec((0u8..4, 1usize..300, any::<bool>()), 1..80),
        ) {
            let mut next_seq = [0u32; 3];
            let mut inputs = Vec::new();
            for (kind, len, psh) in plan {
                let frame = match kind {
                    3 => arp(),
                    flow => {
                        let f = usize::from(flow);
                        let mut t = Tcp::data(1000 + u16::from(flow), next_seq[f], vec![flow; len]);
                        if psh { t.flags |= TCP_FLAG_PSH; }
                        next_seq[f] = next_seq[f].wrapping_add(len as u32);
                        t.frame()
                    }
                };
                inputs.push(frame);
            }
            let mut c = Coalescer::new();
            for f in &inputs {
                c.push(f);
            }
            let out: Vec<Vec<u8>> = drain_all(&mut c)
                .into_iter()
                .flat_map(|(f, g)| resegment(&f, g))
                .collect();
            // Per flow (and for the other frames), the order is kept exactly.
            let by_port = |frames: &[Vec<u8>], port: Option<u16>| -> Vec<Vec<u8>> {
                frames.iter().filter(|f| match parse_tcp(f) {
                    Some(_) => Some(be16(f, ETH_LEN + IPV4_LEN)) == port,
                    None => port.is_none(),
                }).cloned().collect()
            };
            for port in [None, Some(1000), Some(1001), Some(1002)] {
                prop_assert_eq!(by_port(&out, port), by_port(&inputs, port));
            }
        }
    }
}
