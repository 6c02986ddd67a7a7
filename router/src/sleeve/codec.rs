//! The sleeve UDP datagram layout (see `router/docs/sleeve.md`). Pure: encodes into caller-owned
//! `Vec`s (reused, never shrunk) and decodes into views borrowed from the datagram. Every read is
//! bounds-checked; nothing here panics on packet contents.
//!
//! ```text
//! header (28 bytes, AEAD associated data when encrypted)
//!   0      version (1)
//!   1      message type (MessageType)
//!   2      flags: bit 0 = encrypted; other bits must be 0
//!   3      reserved, 0
//!   4..10  sender peer name
//!   10..16 receiver peer name
//!   16..20 key epoch, u32 BE
//!   20..28 counter, u64 BE
//! body (ciphertext when encrypted, followed by a 16-byte tag)
//!   Data:      frames [src peer 6][dst peer 6][len u16 BE][frame len bytes]...
//!   Heartbeat: [connection uid u64 BE][flags u8: bit 0 = "I hear you", bit 1 = established]
//!   PmtuProbe: [probe id u32 BE][overlay mtu u16 BE][zero padding up to the probed size]
//!   PmtuAck:   [probe id u32 BE][overlay mtu u16 BE]
//!   FragTest:  [probe id u32 BE][zero bytes], FRAG_TEST_BODY_LEN in all
//!   FragAck:   [probe id u32 BE]
//!   KeyReady:  [flags u8: bit 0 = ack]
//! ```
//!
//! Acks echo the probe id, so only answers to probes we sent count (see the forwarder).

use super::PeerName;

/// Wire version in byte 0.
pub const VERSION: u8 = 2;
/// Fixed header length.
pub const HEADER_LEN: usize = 28;
/// Per-frame header: src peer, dst peer, length.
pub const FRAME_HEADER_LEN: usize = 14;
/// AEAD tag appended to encrypted datagrams.
pub const TAG_LEN: usize = 16;
/// Inner Ethernet header (counted in the overlay MTU arithmetic).
pub const ETHERNET_HEADER_LEN: usize = 14;
/// Largest UDP payload over IPv4.
pub const MAX_UDP_PAYLOAD: usize = 65507;
/// IPv4 + UDP headers (path MTU = datagram size + this).
pub const IP_UDP_OVERHEAD: usize = 28;
/// Body size of a fragmentation test (the datagram is then ~60 KB: always fragmented).
pub const FRAG_TEST_BODY_LEN: usize = 60000;
/// Body size of a heartbeat.
pub const HEARTBEAT_BODY_LEN: usize = 9;
/// Probe id length at the start of PMTU and fragmentation-test bodies.
const PROBE_ID_LEN: usize = 4;
const PMTU_BODY_MIN: usize = PROBE_ID_LEN + 2;
const KEY_READY_ACK: u8 = 0x01;

const FLAG_ENCRYPTED: u8 = 0x01;
const HEARTBEAT_HEARD: u8 = 0x01;
const HEARTBEAT_ESTABLISHED: u8 = 0x02;

/// Why bytes do not decode. The forwarder maps these to [`super::DropReason`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("too short")]
    TooShort,
    #[error("bad version")]
    BadVersion,
    #[error("unknown message type")]
    UnknownType,
    #[error("trailing garbage after the last frame")]
    TrailingGarbage,
    #[error("frame length overruns the datagram")]
    LengthOverrun,
    #[error("frame longer than 65535 bytes")]
    FrameTooLong,
    #[error("malformed body")]
    Malformed,
}

/// Byte 1 of the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    Data = 0,
    Heartbeat = 1,
    PmtuProbe = 2,
    PmtuAck = 3,
    FragTest = 4,
    FragAck = 5,
    KeyReady = 6,
}

impl MessageType {
    pub const fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0 => MessageType::Data,
            1 => MessageType::Heartbeat,
            2 => MessageType::PmtuProbe,
            3 => MessageType::PmtuAck,
            4 => MessageType::FragTest,
            5 => MessageType::FragAck,
            6 => MessageType::KeyReady,
            _ => return None,
        })
    }
}

/// The fixed datagram header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: MessageType,
    pub encrypted: bool,
    pub sender: PeerName,
    pub receiver: PeerName,
    pub epoch: u32,
    pub counter: u64,
}

impl Header {
    /// The 28 header bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = VERSION;
        b[1] = self.kind as u8;
        b[2] = if self.encrypted { FLAG_ENCRYPTED } else { 0 };
        b[4..10].copy_from_slice(&self.sender.to_bytes());
        b[10..16].copy_from_slice(&self.receiver.to_bytes());
        b[16..20].copy_from_slice(&self.epoch.to_be_bytes());
        b[20..28].copy_from_slice(&self.counter.to_be_bytes());
        b
    }

    /// Append the header to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_bytes());
    }

    /// Parse the header at the start of `datagram`; cheapest checks first.
    pub fn parse(datagram: &[u8]) -> Result<Header, CodecError> {
        let h: &[u8; HEADER_LEN] = datagram
            .get(..HEADER_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(CodecError::TooShort)?;
        let [version, kind, flags, reserved, s0, s1, s2, s3, s4, s5, r0, r1, r2, r3, r4, r5, e0, e1, e2, e3, c0, c1, c2, c3, c4, c5, c6, c7] =
            *h;
        if version != VERSION {
            return Err(CodecError::BadVersion);
        }
        let kind = MessageType::from_u8(kind).ok_or(CodecError::UnknownType)?;
        if flags & !FLAG_ENCRYPTED != 0 || reserved != 0 {
            return Err(CodecError::Malformed);
        }
        Ok(Header {
            kind,
            encrypted: flags & FLAG_ENCRYPTED != 0,
            sender: PeerName::from_bytes([s0, s1, s2, s3, s4, s5]),
            receiver: PeerName::from_bytes([r0, r1, r2, r3, r4, r5]),
            epoch: u32::from_be_bytes([e0, e1, e2, e3]),
            counter: u64::from_be_bytes([c0, c1, c2, c3, c4, c5, c6, c7]),
        })
    }
}

/// One Ethernet frame in a data datagram, with its original source (capturing) peer and final
/// destination peer, so intermediate hops can relay it unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub src: PeerName,
    pub dst: PeerName,
    pub data: &'a [u8],
}

/// Append one frame record `[src][dst][len][data]` to `out`.
pub fn write_frame(
    out: &mut Vec<u8>,
    src: PeerName,
    dst: PeerName,
    data: &[u8],
) -> Result<(), CodecError> {
    let len = u16::try_from(data.len()).map_err(|_| CodecError::FrameTooLong)?;
    out.extend_from_slice(&src.to_bytes());
    out.extend_from_slice(&dst.to_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
    Ok(())
}

/// Size of a frame record for a frame of `data_len` bytes.
pub const fn frame_record_len(data_len: usize) -> usize {
    FRAME_HEADER_LEN + data_len
}

/// Iterator over the frames of a data body. Stops at the first malformed record; frames before
/// it are delivered, and [`Frames::error`] then says what was wrong.
#[derive(Debug, Clone)]
pub struct Frames<'a> {
    rest: &'a [u8],
    error: Option<CodecError>,
}

/// Decode the frame records of a (decrypted) data body.
pub fn frames(body: &[u8]) -> Frames<'_> {
    Frames {
        rest: body,
        error: None,
    }
}

impl<'a> Frames<'a> {
    /// The error that stopped iteration, once it stopped.
    pub fn error(&self) -> Option<CodecError> {
        self.error
    }

    /// Walk a copy to the end: (number of good frames, error if any). No allocation.
    pub fn validate(&self) -> (usize, Option<CodecError>) {
        let mut it = self.clone();
        let n = it.by_ref().count();
        (n, it.error)
    }
}

impl<'a> Iterator for Frames<'a> {
    type Item = Frame<'a>;

    fn next(&mut self) -> Option<Frame<'a>> {
        if self.rest.is_empty() || self.error.is_some() {
            return None;
        }
        let Some((head, tail)) = self.rest.split_first_chunk::<FRAME_HEADER_LEN>() else {
            self.error = Some(CodecError::TrailingGarbage);
            self.rest = &[];
            return None;
        };
        let [s0, s1, s2, s3, s4, s5, d0, d1, d2, d3, d4, d5, l0, l1] = *head;
        let len = usize::from(u16::from_be_bytes([l0, l1]));
        let Some((data, rest)) = tail.split_at_checked(len) else {
            self.error = Some(CodecError::LengthOverrun);
            self.rest = &[];
            return None;
        };
        self.rest = rest;
        Some(Frame {
            src: PeerName::from_bytes([s0, s1, s2, s3, s4, s5]),
            dst: PeerName::from_bytes([d0, d1, d2, d3, d4, d5]),
            data,
        })
    }
}

/// A decoded control message (every type except Data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// `heard`: the sender has received a valid heartbeat from us on this connection;
    /// `established`: the sender knows we hear it too (it is established).
    Heartbeat {
        conn_uid: u64,
        heard: bool,
        established: bool,
    },
    /// Probe `id` of the overlay MTU `mtu`; the datagram is exactly [`datagram_len_for_mtu`]
    /// long (at least the header and [`PMTU_BODY_MIN`] bytes).
    PmtuProbe {
        id: u32,
        mtu: u16,
    },
    /// Answer to probe `id` of `mtu`.
    PmtuAck {
        id: u32,
        mtu: u16,
    },
    /// A fragmentation test (always kernel-fragmented); answered with `FragAck` of its `id`.
    FragTest {
        id: u32,
    },
    FragAck {
        id: u32,
    },
    /// "I hold the keys of this datagram's epoch" (`ack: false`, sent on the newest epoch until
    /// the sender switches), or the answer to one (`ack: true`). See [`super::keyring`].
    KeyReady {
        ack: bool,
    },
}

impl Control {
    pub const fn kind(&self) -> MessageType {
        match self {
            Control::Heartbeat { .. } => MessageType::Heartbeat,
            Control::PmtuProbe { .. } => MessageType::PmtuProbe,
            Control::PmtuAck { .. } => MessageType::PmtuAck,
            Control::FragTest { .. } => MessageType::FragTest,
            Control::FragAck { .. } => MessageType::FragAck,
            Control::KeyReady { .. } => MessageType::KeyReady,
        }
    }

    /// Append the body. A probe is padded so the whole datagram (header, body, tag when
    /// `encrypted`) is [`datagram_len_for_mtu`]`(mtu, encrypted)` bytes.
    pub fn write_body(&self, out: &mut Vec<u8>, encrypted: bool) {
        match *self {
            Control::Heartbeat {
                conn_uid,
                heard,
                established,
            } => {
                out.extend_from_slice(&conn_uid.to_be_bytes());
                let mut flags = 0;
                if heard {
                    flags |= HEARTBEAT_HEARD;
                }
                if established {
                    flags |= HEARTBEAT_ESTABLISHED;
                }
                out.push(flags);
            }
            Control::PmtuProbe { id, mtu } => {
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&mtu.to_be_bytes());
                let body = probe_body_len(mtu, encrypted);
                out.resize(out.len() + body.saturating_sub(PMTU_BODY_MIN), 0);
            }
            Control::PmtuAck { id, mtu } => {
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&mtu.to_be_bytes());
            }
            Control::FragTest { id } => {
                out.extend_from_slice(&id.to_be_bytes());
                out.resize(out.len() + FRAG_TEST_BODY_LEN - PROBE_ID_LEN, 0);
            }
            Control::FragAck { id } => out.extend_from_slice(&id.to_be_bytes()),
            Control::KeyReady { ack } => out.push(if ack { KEY_READY_ACK } else { 0 }),
        }
    }

    /// Decode the body of a control message of type `kind` (not Data).
    pub fn parse(kind: MessageType, body: &[u8], encrypted: bool) -> Result<Control, CodecError> {
        match kind {
            MessageType::Data => Err(CodecError::UnknownType),
            MessageType::Heartbeat => {
                let b: [u8; HEARTBEAT_BODY_LEN] =
                    body.try_into().map_err(|_| CodecError::Malformed)?;
                let [u0, u1, u2, u3, u4, u5, u6, u7, flags] = b;
                if flags & !(HEARTBEAT_HEARD | HEARTBEAT_ESTABLISHED) != 0 {
                    return Err(CodecError::Malformed);
                }
                Ok(Control::Heartbeat {
                    conn_uid: u64::from_be_bytes([u0, u1, u2, u3, u4, u5, u6, u7]),
                    heard: flags & HEARTBEAT_HEARD != 0,
                    established: flags & HEARTBEAT_ESTABLISHED != 0,
                })
            }
            MessageType::PmtuProbe => {
                let ([i0, i1, i2, i3, m0, m1], _) = body
                    .split_first_chunk::<PMTU_BODY_MIN>()
                    .map(|(h, t)| (*h, t))
                    .ok_or(CodecError::TooShort)?;
                let mtu = u16::from_be_bytes([m0, m1]);
                if body.len() != probe_body_len(mtu, encrypted).max(PMTU_BODY_MIN) {
                    return Err(CodecError::Malformed);
                }
                Ok(Control::PmtuProbe {
                    id: u32::from_be_bytes([i0, i1, i2, i3]),
                    mtu,
                })
            }
            MessageType::PmtuAck => {
                let [i0, i1, i2, i3, m0, m1]: [u8; PMTU_BODY_MIN] =
                    body.try_into().map_err(|_| CodecError::Malformed)?;
                Ok(Control::PmtuAck {
                    id: u32::from_be_bytes([i0, i1, i2, i3]),
                    mtu: u16::from_be_bytes([m0, m1]),
                })
            }
            MessageType::FragTest => {
                if body.len() != FRAG_TEST_BODY_LEN {
                    return Err(CodecError::Malformed);
                }
                let (id, _) = body
                    .split_first_chunk::<PROBE_ID_LEN>()
                    .ok_or(CodecError::Malformed)?;
                Ok(Control::FragTest {
                    id: u32::from_be_bytes(*id),
                })
            }
            MessageType::FragAck => {
                let id: [u8; PROBE_ID_LEN] = body.try_into().map_err(|_| CodecError::Malformed)?;
                Ok(Control::FragAck {
                    id: u32::from_be_bytes(id),
                })
            }
            MessageType::KeyReady => match body {
                [flags] if flags & !KEY_READY_ACK == 0 => Ok(Control::KeyReady {
                    ack: flags & KEY_READY_ACK != 0,
                }),
                _ => Err(CodecError::Malformed),
            },
        }
    }
}

/// Bytes a datagram spends around one full-size inner Ethernet payload: header, tag when
/// encrypted, one frame header, the inner Ethernet header (plain 56, encrypted 72).
pub const fn overlay_overhead(encrypted: bool) -> usize {
    HEADER_LEN + if encrypted { TAG_LEN } else { 0 } + FRAME_HEADER_LEN + ETHERNET_HEADER_LEN
}

/// Datagram size (UDP payload) that carries one frame of overlay MTU `mtu`.
pub const fn datagram_len_for_mtu(mtu: u16, encrypted: bool) -> usize {
    mtu as usize + overlay_overhead(encrypted)
}

/// The overlay MTU that fits a datagram of `len` bytes (saturating at 0 and u16::MAX).
pub fn mtu_for_datagram_len(len: usize, encrypted: bool) -> u16 {
    u16::try_from(len.saturating_sub(overlay_overhead(encrypted))).unwrap_or(u16::MAX)
}

/// Body (plaintext) length of a probe for `mtu`.
fn probe_body_len(mtu: u16, encrypted: bool) -> usize {
    datagram_len_for_mtu(mtu, encrypted)
        .saturating_sub(HEADER_LEN + if encrypted { TAG_LEN } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header() -> Header {
        Header {
            kind: MessageType::Data,
            encrypted: true,
            sender: PeerName::from_u64(0x7e21_4a70_2f45),
            receiver: PeerName::from_u64(1),
            epoch: 7,
            counter: u64::MAX - 3,
        }
    }

    #[test]
    fn header_round_trip_and_checks() {
        let h = header();
        let b = h.to_bytes();
        assert_eq!(Header::parse(&b), Ok(h));
        assert_eq!(Header::parse(&b[..27]), Err(CodecError::TooShort));
        let mut bad = b;
        bad[0] = 1;
        assert_eq!(Header::parse(&bad), Err(CodecError::BadVersion));
        let mut bad = b;
        bad[1] = 9;
        assert_eq!(Header::parse(&bad), Err(CodecError::UnknownType));
        let mut bad = b;
        bad[2] = 0x81;
        assert_eq!(Header::parse(&bad), Err(CodecError::Malformed));
    }

    #[test]
    fn frames_before_a_bad_one_are_delivered() {
        let mut body = Vec::new();
        let (a, b) = (PeerName::from_u64(1), PeerName::from_u64(2));
        write_frame(&mut body, a, b, b"first").unwrap();
        write_frame(&mut body, b, a, b"second").unwrap();
        let good = body.len();
        body.extend_from_slice(&[0; 5]);
        let mut it = frames(&body);
        assert_eq!(it.next().map(|f| f.data), Some(&b"first"[..]));
        assert_eq!(
            it.next().map(|f| (f.src, f.dst, f.data)),
            Some((b, a, &b"second"[..]))
        );
        assert_eq!(it.next(), None);
        assert_eq!(it.error(), Some(CodecError::TrailingGarbage));

        body.truncate(good);
        write_frame(&mut body, a, b, b"third").unwrap();
        body.pop();
        assert_eq!(
            frames(&body).validate(),
            (2, Some(CodecError::LengthOverrun))
        );
        assert_eq!(frames(&[]).validate(), (0, None));
    }

    #[test]
    fn control_round_trip() {
        for enc in [false, true] {
            for c in [
                Control::Heartbeat {
                    conn_uid: 0xdead_beef,
                    heard: true,
                    established: false,
                },
                Control::PmtuProbe {
                    id: 0xfeed_f00d,
                    mtu: 1400,
                },
                Control::PmtuProbe { id: 1, mtu: 0 },
                Control::PmtuAck { id: 7, mtu: 1400 },
                Control::FragTest { id: u32::MAX },
                Control::FragAck { id: 3 },
                Control::KeyReady { ack: false },
                Control::KeyReady { ack: true },
            ] {
                let mut body = Vec::new();
                c.write_body(&mut body, enc);
                assert_eq!(Control::parse(c.kind(), &body, enc), Ok(c));
                if let Control::PmtuProbe { mtu, .. } = c {
                    let total = HEADER_LEN + body.len() + if enc { TAG_LEN } else { 0 };
                    if mtu > 0 {
                        assert_eq!(total, datagram_len_for_mtu(mtu, enc));
                    }
                }
            }
        }
        assert_eq!(overlay_overhead(false), 56);
        assert_eq!(overlay_overhead(true), 72);
        // 1500-byte path: 1472-byte datagrams carry 1416 (plain) / 1400 (encrypted).
        assert_eq!(mtu_for_datagram_len(1472, false), 1416);
        assert_eq!(mtu_for_datagram_len(1472, true), 1400);
    }

    proptest! {
        #[test]
        fn frames_round_trip(batch in proptest::collection::vec(
            (any::<u64>(), any::<u64>(), proptest::collection::vec(any::<u8>(), 0..300)), 0..20)) {
            let mut body = Vec::new();
            for (s, d, data) in &batch {
                write_frame(&mut body, PeerName::from_u64(*s), PeerName::from_u64(*d), data).unwrap();
            }
            let mut it = frames(&body);
            let got: Vec<_> = it.by_ref().map(|f| (f.src, f.dst, f.data.to_vec())).collect();
            prop_assert_eq!(it.error(), None);
            let want: Vec<_> = batch
                .iter()
                .map(|(s, d, data)| (PeerName::from_u64(*s), PeerName::from_u64(*d), data.clone()))
                .collect();
            prop_assert_eq!(got, want);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Header::parse(&bytes);
            let (n, _) = frames(&bytes).validate();
            // Decoded frames never account for more bytes than the input.
            let used: usize = frames(&bytes).map(|f| frame_record_len(f.data.len())).sum();
            prop_assert!(used <= bytes.len());
            prop_assert!(n * FRAME_HEADER_LEN <= bytes.len());
            for k in 0..8u8 {
                if let Some(kind) = MessageType::from_u8(k) {
                    let _ = Control::parse(kind, &bytes, k % 2 == 0);
                }
            }
        }
    }
}
