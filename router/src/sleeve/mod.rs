//! The sleeve data plane core: pure and sans-IO (no sockets, no clock; `now` is passed in).
//!
//! - [`codec`]: the UDP datagram layout (header, frame batches, control messages).
//! - [`crypto`]: ChaCha20-Poly1305 per-direction keys, replay window.
//! - [`keyring`]: which key epochs are sent and received on across rekeys (no loss).
//! - [`forwarder`]: the per-peer-connection UDP state machine (heartbeats, PMTU discovery,
//!   fragmentation test, batching), driven quinn-style by a shell that owns the sockets.
//!
//! The wire format is ours (no interop with Go Weave); see `router/docs/sleeve.md`.

pub mod codec;
pub mod crypto;
pub mod forwarder;
pub mod keyring;

#[cfg(test)]
mod tests;

/// The mesh's peer name (48 bits, 6 bytes on the wire), shared with the sleeve.
pub use crate::mesh::peer::PeerName;
pub use codec::{CodecError, Control, Frame, Frames, Header, MessageType};
pub use crypto::{OpeningKey, ReplayWindow, SealingKey, SendKey, SessionKeys};
pub use forwarder::{Forwarder, ForwarderConfig, ForwarderEvent, Received, Transmit};
pub use keyring::{KeyRing, KeyStats};

/// Why a datagram (or a frame handed to the forwarder) was dropped. Fieldless: cheap to return
/// per packet and usable as a metric label ([`DropReason::as_str`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum DropReason {
    #[error("datagram too short")]
    TooShort,
    #[error("unsupported sleeve version")]
    BadVersion,
    #[error("unknown message type")]
    UnknownType,
    #[error("encrypted flag does not match the connection's mode")]
    WrongMode,
    #[error("sender or receiver peer does not match this connection")]
    WrongPeer,
    #[error("key epoch no longer accepted")]
    StaleEpoch,
    #[error("key epoch not known yet")]
    UnknownEpoch,
    #[error("counter below the replay window")]
    TooOld,
    #[error("counter already seen")]
    Replayed,
    #[error("authentication failed")]
    BadTag,
    #[error("malformed message body")]
    Malformed,
    #[error("trailing garbage after the last frame")]
    TrailingGarbage,
    #[error("frame length overruns the datagram")]
    LengthOverrun,
    #[error("heartbeat for another connection")]
    WrongConnection,
    #[error("peer UDP address not known yet (awaiting contact)")]
    NoAddress,
    #[error("frame larger than the path allows")]
    FrameTooBig,
    #[error("send queue full")]
    QueueFull,
    #[error("send counter exhausted: rekey needed")]
    CounterExhausted,
    #[error("forwarder closed")]
    Closed,
    #[error("acknowledgement of no probe we sent")]
    UnexpectedAck,
    #[error("plaintext datagram from another address than the connection's")]
    WrongAddress,
    #[error("KeyReady on an epoch we do not hold yet (harmless: it is retried)")]
    EarlyKeyReady,
}

impl DropReason {
    /// Every variant, in declaration order (index = `self as usize`).
    pub const ALL: [DropReason; 22] = [
        DropReason::TooShort,
        DropReason::BadVersion,
        DropReason::UnknownType,
        DropReason::WrongMode,
        DropReason::WrongPeer,
        DropReason::StaleEpoch,
        DropReason::UnknownEpoch,
        DropReason::TooOld,
        DropReason::Replayed,
        DropReason::BadTag,
        DropReason::Malformed,
        DropReason::TrailingGarbage,
        DropReason::LengthOverrun,
        DropReason::WrongConnection,
        DropReason::NoAddress,
        DropReason::FrameTooBig,
        DropReason::QueueFull,
        DropReason::CounterExhausted,
        DropReason::Closed,
        DropReason::UnexpectedAck,
        DropReason::WrongAddress,
        DropReason::EarlyKeyReady,
    ];
    pub const COUNT: usize = Self::ALL.len();

    /// A stable snake_case label for metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::TooShort => "too_short",
            DropReason::BadVersion => "bad_version",
            DropReason::UnknownType => "unknown_type",
            DropReason::WrongMode => "wrong_mode",
            DropReason::WrongPeer => "wrong_peer",
            DropReason::StaleEpoch => "stale_epoch",
            DropReason::UnknownEpoch => "unknown_epoch",
            DropReason::TooOld => "too_old",
            DropReason::Replayed => "replayed",
            DropReason::BadTag => "bad_tag",
            DropReason::Malformed => "malformed",
            DropReason::TrailingGarbage => "trailing_garbage",
            DropReason::LengthOverrun => "length_overrun",
            DropReason::WrongConnection => "wrong_connection",
            DropReason::NoAddress => "no_address",
            DropReason::FrameTooBig => "frame_too_big",
            DropReason::QueueFull => "queue_full",
            DropReason::CounterExhausted => "counter_exhausted",
            DropReason::Closed => "closed",
            DropReason::UnexpectedAck => "unexpected_ack",
            DropReason::WrongAddress => "wrong_address",
            DropReason::EarlyKeyReady => "early_key_ready",
        }
    }
}

impl From<CodecError> for DropReason {
    fn from(e: CodecError) -> Self {
        match e {
            CodecError::TooShort => DropReason::TooShort,
            CodecError::BadVersion => DropReason::BadVersion,
            CodecError::UnknownType => DropReason::UnknownType,
            CodecError::TrailingGarbage => DropReason::TrailingGarbage,
            CodecError::LengthOverrun => DropReason::LengthOverrun,
            CodecError::FrameTooLong | CodecError::Malformed => DropReason::Malformed,
        }
    }
}

/// Per-[`DropReason`] counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DropCounters([u64; DropReason::COUNT]);

impl DropCounters {
    pub fn record(&mut self, reason: DropReason) {
        if let Some(c) = self.0.get_mut(reason as usize) {
            *c = c.saturating_add(1);
        }
    }

    pub fn get(&self, reason: DropReason) -> u64 {
        self.0.get(reason as usize).copied().unwrap_or(0)
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Non-zero counters, as (label, count).
    pub fn iter(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL
            .iter()
            .map(|r| (*r, self.get(*r)))
            .filter(|(_, n)| *n > 0)
    }
}

#[cfg(test)]
mod drop_reason_tests {
    use super::*;

    #[test]
    fn all_lists_every_variant_in_order_with_unique_labels() {
        let mut labels = std::collections::HashSet::new();
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
            assert!(labels.insert(r.as_str()));
        }
        let mut c = DropCounters::default();
        c.record(DropReason::Closed);
        c.record(DropReason::BadTag);
        c.record(DropReason::BadTag);
        assert_eq!(c.total(), 3);
        assert_eq!(
            c.iter().collect::<Vec<_>>(),
            vec![(DropReason::BadTag, 2), (DropReason::Closed, 1)]
        );
    }
}
