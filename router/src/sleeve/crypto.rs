//! Sleeve datagram crypto: ChaCha20-Poly1305 with one key per direction (handed over by the mesh
//! handshake), 96-bit nonce = key epoch (u32 BE) ‖ counter (u64 BE), the datagram header as
//! associated data and a sliding replay window. Which epochs are used when: [`super::keyring`].
//!
//! Receive order (boringtun): cheap header checks (done by the caller), epoch lookup, replay
//! window check, AEAD open, then mark the counter — so forged counters can never move the window.

use std::fmt;

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, Key, KeyInit, Nonce, Tag};

use super::codec::TAG_LEN;
use super::DropReason;

/// Refuse to send after this many datagrams under one key (far below nonce reuse).
pub const REJECT_AFTER_MESSAGES: u64 = 1 << 60;
/// Replay window width in counters.
pub const REPLAY_WINDOW: u64 = 2048;
const WORDS: usize = (REPLAY_WINDOW / 64) as usize;

fn nonce(epoch: u32, counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&epoch.to_be_bytes());
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::from(n)
}

/// The keys the mesh handshake hands over for one peer connection's UDP traffic.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKeys {
    /// Key epoch (session id): 0 for the first key, +1 per rekey. Goes in every header.
    pub epoch: u32,
    /// Key for our datagrams to the peer (the peer's `recv`).
    pub send: [u8; 32],
    /// Key for the peer's datagrams to us (the peer's `send`).
    pub recv: [u8; 32],
}

impl fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionKeys")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

/// Encrypts datagrams of one direction under one key epoch.
#[derive(Clone)]
pub struct SealingKey {
    cipher: ChaCha20Poly1305,
    epoch: u32,
}

impl SealingKey {
    pub fn new(key: [u8; 32], epoch: u32) -> Self {
        SealingKey {
            cipher: ChaCha20Poly1305::new(&Key::from(key)),
            epoch,
        }
    }

    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Encrypt `buf[aad_len..]` in place with `buf[..aad_len]` as associated data, then append
    /// the tag. Returns the new length. Errors only if `aad_len > buf.len()` (caller bug) or the
    /// plaintext is too long for the AEAD (never for a datagram).
    pub fn seal(
        &self,
        counter: u64,
        buf: &mut Vec<u8>,
        aad_len: usize,
    ) -> Result<usize, DropReason> {
        if aad_len > buf.len() {
            return Err(DropReason::TooShort);
        }
        let (aad, plaintext) = buf.split_at_mut(aad_len);
        let tag = self
            .cipher
            .encrypt_in_place_detached(&nonce(self.epoch, counter), aad, plaintext)
            .map_err(|_| DropReason::Malformed)?;
        buf.extend_from_slice(&tag);
        Ok(buf.len())
    }
}

impl fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealingKey")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

/// Decrypts datagrams of one direction under one key epoch.
#[derive(Clone)]
pub struct OpeningKey {
    cipher: ChaCha20Poly1305,
    epoch: u32,
}

impl OpeningKey {
    pub fn new(key: [u8; 32], epoch: u32) -> Self {
        OpeningKey {
            cipher: ChaCha20Poly1305::new(&Key::from(key)),
            epoch,
        }
    }

    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Verify and decrypt `datagram[aad_len..]` (ciphertext ‖ tag) in place, with
    /// `datagram[..aad_len]` as associated data. Returns the plaintext view.
    pub fn open<'a>(
        &self,
        counter: u64,
        datagram: &'a mut [u8],
        aad_len: usize,
    ) -> Result<&'a mut [u8], DropReason> {
        if datagram.len() < aad_len + TAG_LEN {
            return Err(DropReason::TooShort);
        }
        let (aad, rest) = datagram.split_at_mut(aad_len);
        let ct_len = rest.len() - TAG_LEN;
        let (ct, tag) = rest.split_at_mut(ct_len);
        let tag: [u8; TAG_LEN] = (&*tag).try_into().map_err(|_| DropReason::TooShort)?;
        self.cipher
            .decrypt_in_place_detached(&nonce(self.epoch, counter), aad, ct, &Tag::from(tag))
            .map_err(|_| DropReason::BadTag)?;
        Ok(ct)
    }
}

impl fmt::Debug for OpeningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpeningKey")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

/// Sliding replay window (RFC 6479 style bitmap, [`REPLAY_WINDOW`] counters wide). `check` is
/// cheap and side-effect free; `mark` only after the AEAD verified.
#[derive(Clone, PartialEq, Eq)]
pub struct ReplayWindow {
    /// Highest counter marked so far (meaningless while `!any`).
    max: u64,
    any: bool,
    /// Bit `c % REPLAY_WINDOW` is set when counter `c` (within the window) was seen.
    bits: [u64; WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow {
            max: 0,
            any: false,
            bits: [0; WORDS],
        }
    }
}

impl fmt::Debug for ReplayWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayWindow")
            .field("max", &self.any.then_some(self.max))
            .finish_non_exhaustive()
    }
}

impl ReplayWindow {
    fn slot(counter: u64) -> (usize, u64) {
        let bit = counter % REPLAY_WINDOW;
        ((bit / 64) as usize, 1u64 << (bit % 64))
    }

    fn is_set(&self, counter: u64) -> bool {
        let (w, m) = Self::slot(counter);
        self.bits.get(w).is_some_and(|word| word & m != 0)
    }

    /// Would `counter` be accepted?
    pub fn check(&self, counter: u64) -> Result<(), DropReason> {
        if counter >= REJECT_AFTER_MESSAGES {
            return Err(DropReason::TooOld);
        }
        if !self.any || counter > self.max {
            return Ok(());
        }
        if self.max - counter >= REPLAY_WINDOW {
            return Err(DropReason::TooOld);
        }
        if self.is_set(counter) {
            return Err(DropReason::Replayed);
        }
        Ok(())
    }

    /// Record `counter` (after authentication). Returns the same verdict as `check`.
    pub fn mark(&mut self, counter: u64) -> Result<(), DropReason> {
        self.check(counter)?;
        if !self.any {
            self.any = true;
            self.max = counter;
        } else if counter > self.max {
            let advance = counter - self.max;
            if advance >= REPLAY_WINDOW {
                self.bits = [0; WORDS];
            } else {
                for c in self.max + 1..counter {
                    let (w, m) = Self::slot(c);
                    if let Some(word) = self.bits.get_mut(w) {
                        *word &= !m;
                    }
                }
            }
            self.max = counter;
        }
        let (w, m) = Self::slot(counter);
        if let Some(word) = self.bits.get_mut(w) {
            *word |= m;
        }
        Ok(())
    }
}

/// Send side: the current sealing key and its counter.
#[derive(Debug)]
pub struct SendKey {
    key: SealingKey,
    next: u64,
}

impl SendKey {
    pub fn new(key: [u8; 32], epoch: u32) -> Self {
        SendKey {
            key: SealingKey::new(key, epoch),
            next: 0,
        }
    }

    pub fn epoch(&self) -> u32 {
        self.key.epoch
    }

    /// Take the next counter for a datagram.
    pub fn next_counter(&mut self) -> Result<u64, DropReason> {
        if self.next >= REJECT_AFTER_MESSAGES {
            return Err(DropReason::CounterExhausted);
        }
        let c = self.next;
        self.next += 1;
        Ok(c)
    }

    /// Datagrams sent under this key so far.
    pub fn sent(&self) -> u64 {
        self.next
    }

    pub fn seal(
        &self,
        counter: u64,
        buf: &mut Vec<u8>,
        aad_len: usize,
    ) -> Result<usize, DropReason> {
        self.key.seal(counter, buf, aad_len)
    }
}

/// Serial-number comparison (RFC 1982) so epochs may wrap.
pub fn epoch_after(a: u32, b: u32) -> bool {
    a != b && a.wrapping_sub(b) < (1 << 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_window() {
        let mut w = ReplayWindow::default();
        assert_eq!(w.mark(5), Ok(()));
        assert_eq!(w.check(5), Err(DropReason::Replayed));
        assert_eq!(w.mark(3), Ok(()));
        assert_eq!(w.mark(3), Err(DropReason::Replayed));
        assert_eq!(w.mark(4), Ok(()));
        assert_eq!(w.mark(5 + REPLAY_WINDOW - 1), Ok(()));
        assert_eq!(w.check(5), Err(DropReason::Replayed));
        assert_eq!(w.check(4), Err(DropReason::TooOld));
        assert_eq!(w.check(6), Ok(()));
        assert_eq!(w.mark(6 + REPLAY_WINDOW), Ok(()));
        assert_eq!(w.check(5 + REPLAY_WINDOW - 1), Err(DropReason::Replayed));
        // A jump clears everything except the new counter.
        assert_eq!(w.mark(100 * REPLAY_WINDOW), Ok(()));
        assert_eq!(w.check(100 * REPLAY_WINDOW - 1), Ok(()));
        assert_eq!(
            w.check(100 * REPLAY_WINDOW - REPLAY_WINDOW),
            Err(DropReason::TooOld)
        );
        assert_eq!(w.check(REJECT_AFTER_MESSAGES), Err(DropReason::TooOld));
    }

    #[test]
    fn seal_open_and_tamper() {
        let s = SealingKey::new([7; 32], 3);
        let o = OpeningKey::new([7; 32], 3);
        let mut buf = b"headerplaintext".to_vec();
        let len = s.seal(9, &mut buf, 6).unwrap();
        assert_eq!(len, 15 + TAG_LEN);
        let mut copy = buf.clone();
        assert_eq!(o.open(9, &mut copy, 6).unwrap(), b"plaintext");
        let mut copy = buf.clone();
        assert_eq!(o.open(10, &mut copy, 6), Err(DropReason::BadTag));
        for i in 0..buf.len() * 8 {
            let mut copy = buf.clone();
            copy[i / 8] ^= 1 << (i % 8);
            assert_eq!(o.open(9, &mut copy, 6), Err(DropReason::BadTag), "bit {i}");
        }
        assert_eq!(o.open(9, &mut [0u8; 10], 6), Err(DropReason::TooShort));
    }

    #[test]
    fn debug_hides_keys() {
        let keys = SessionKeys {
            epoch: 1,
            send: [0xab; 32],
            recv: [0xcd; 32],
        };
        let text = format!(
            "{keys:?} {:?} {:?}",
            SendKey::new(keys.send, 1),
            OpeningKey::new(keys.recv, 1)
        );
        assert!(!text.contains("171") && !text.contains("ab, ") && !text.contains("205"));
        assert!(text.contains("epoch"));
    }
}
