//! Which UDP key epochs a forwarder sends and receives on (pure; `now` is passed in).
//!
//! The mesh hands both sides a new epoch's keys about one round trip apart (the TCP rekey
//! responder first). Sending on a new epoch before the peer has its keys loses traffic, so,
//! as WireGuard does, a side keeps sending on its current epoch until it has *evidence* that the
//! peer holds the new keys: an authenticated datagram received on that epoch (both directions'
//! keys of an epoch come from one derivation, so a peer that sealed with epoch e can open e).
//! Without data to carry that evidence, a side that holds a newer epoch than it sends on sends
//! `KeyReady` on the newest epoch every [`KeyRing::retry`] until it switches; a `KeyReady` is
//! answered at once with `KeyReady{ack}` on the (then switched) sending epoch.
//!
//! Receiving works on up to [`MAX_EPOCHS`] recent epochs. An epoch older than the sending one
//! is kept for `overlap` after we moved past it (the peer switches about a round trip after us,
//! later if our evidence is lost), then forgotten.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::crypto::{epoch_after, OpeningKey, ReplayWindow, SendKey, SessionKeys};
use super::DropReason;

/// Most epochs held at once (sending, older ones in their overlap, newer pending ones).
pub const MAX_EPOCHS: usize = 4;

#[derive(Debug)]
struct Epoch {
    epoch: u32,
    send: SendKey,
    open: OpeningKey,
    window: ReplayWindow,
    /// Set once we send on a newer epoch: receiving on this one stops at that instant.
    expires: Option<Instant>,
}

impl Epoch {
    fn new(k: &SessionKeys) -> Self {
        Epoch {
            epoch: k.epoch,
            send: SendKey::new(k.send, k.epoch),
            open: OpeningKey::new(k.recv, k.epoch),
            window: ReplayWindow::default(),
            expires: None,
        }
    }
}

/// Counters about epochs, for status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyStats {
    /// Times the sending epoch moved to a newer one.
    pub switches: u64,
}

/// The key epochs of one encrypted forwarder.
#[derive(Debug)]
pub struct KeyRing {
    /// Ascending (serial order), never empty; contains `sending`.
    epochs: VecDeque<Epoch>,
    sending: u32,
    overlap: Duration,
    retry: Duration,
    /// When to send the next `KeyReady` (only while a newer epoch than `sending` is held).
    next_key_ready: Option<Instant>,
    stats: KeyStats,
}

impl KeyRing {
    /// Start with the handshake's keys (sent and received on at once: both sides have them).
    pub fn new(keys: &SessionKeys, overlap: Duration, retry: Duration) -> Self {
        KeyRing {
            epochs: VecDeque::from([Epoch::new(keys)]),
            sending: keys.epoch,
            overlap,
            retry,
            next_key_ready: None,
            stats: KeyStats::default(),
        }
    }

    pub fn sending_epoch(&self) -> u32 {
        self.sending
    }

    /// The newest epoch we hold keys for.
    pub fn newest_epoch(&self) -> u32 {
        self.epochs.back().map_or(self.sending, |e| e.epoch)
    }

    pub fn stats(&self) -> KeyStats {
        self.stats
    }

    /// Epochs we can receive on right now, oldest first.
    pub fn receiving_epochs(&self, now: Instant) -> impl Iterator<Item = u32> + '_ {
        self.epochs
            .iter()
            .filter(move |e| e.expires.is_none_or(|t| now < t))
            .map(|e| e.epoch)
    }

    /// Add a new epoch's keys; returns false (ignored) unless it is newer than every epoch held.
    /// Receiving on it starts now; sending waits for evidence. Over [`MAX_EPOCHS`], the oldest
    /// epoch other than the sending one goes.
    pub fn install(&mut self, now: Instant, keys: &SessionKeys) -> bool {
        if !epoch_after(keys.epoch, self.newest_epoch()) {
            return false;
        }
        self.epochs.push_back(Epoch::new(keys));
        while self.epochs.len() > MAX_EPOCHS {
            let sending = self.sending;
            match self.epochs.iter().position(|e| e.epoch != sending) {
                Some(i) => {
                    self.epochs.remove(i);
                }
                None => break,
            }
        }
        // Not at once: the peer (the rekey initiator) usually gets these keys a round trip
        // after us, and a KeyReady it cannot open is lost; its own KeyReady will come first.
        self.next_key_ready.get_or_insert(now + self.retry);
        true
    }

    /// Epoch lookup, replay check, AEAD open, mark; then switch sending to `epoch` if it is
    /// newer (the peer proved it holds its keys). Returns the plaintext body view.
    pub fn open<'a>(
        &mut self,
        now: Instant,
        epoch: u32,
        counter: u64,
        datagram: &'a mut [u8],
        aad_len: usize,
    ) -> Result<&'a mut [u8], DropReason> {
        let newest = self.newest_epoch();
        let Some(slot) = self.epochs.iter_mut().find(|e| e.epoch == epoch) else {
            return Err(if epoch_after(epoch, newest) {
                DropReason::UnknownEpoch
            } else {
                DropReason::StaleEpoch
            });
        };
        if slot.expires.is_some_and(|t| now >= t) {
            return Err(DropReason::StaleEpoch);
        }
        slot.window.check(counter)?;
        let plain = slot.open.open(counter, datagram, aad_len)?;
        slot.window.mark(counter)?;
        if epoch_after(epoch, self.sending) {
            self.switch_to(now, epoch);
        }
        Ok(plain)
    }

    fn switch_to(&mut self, now: Instant, epoch: u32) {
        self.sending = epoch;
        self.stats.switches += 1;
        let until = now + self.overlap;
        for e in &mut self.epochs {
            if epoch_after(epoch, e.epoch) && e.expires.is_none() {
                e.expires = Some(until);
            }
        }
        if self.newest_epoch() == epoch {
            self.next_key_ready = None;
        }
    }

    /// Due at `now`: the epoch to send a `KeyReady` on (the newest, while we do not send on it).
    pub fn poll_key_ready(&mut self, now: Instant) -> Option<u32> {
        let at = self.next_key_ready?;
        if now < at {
            return None;
        }
        let newest = self.newest_epoch();
        if newest == self.sending {
            self.next_key_ready = None;
            return None;
        }
        self.next_key_ready = Some(now + self.retry);
        Some(newest)
    }

    /// Forget epochs whose overlap is over.
    pub fn expire(&mut self, now: Instant) {
        self.epochs.retain(|e| e.expires.is_none_or(|t| now < t));
    }

    /// The next instant `poll_key_ready` or `expire` has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.epochs
            .iter()
            .filter_map(|e| e.expires)
            .chain(self.next_key_ready)
            .min()
    }

    fn get_mut(&mut self, epoch: u32) -> Result<&mut Epoch, DropReason> {
        self.epochs
            .iter_mut()
            .find(|e| e.epoch == epoch)
            .ok_or(DropReason::StaleEpoch)
    }

    /// Take the next counter of `epoch`'s send key.
    pub fn next_counter(&mut self, epoch: u32) -> Result<u64, DropReason> {
        self.get_mut(epoch)?.send.next_counter()
    }

    /// Seal with `epoch`'s send key (see [`SendKey::seal`]).
    pub fn seal(
        &mut self,
        epoch: u32,
        counter: u64,
        buf: &mut Vec<u8>,
        aad_len: usize,
    ) -> Result<usize, DropReason> {
        self.get_mut(epoch)?.send.seal(counter, buf, aad_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OVERLAP: Duration = Duration::from_secs(10);
    const RETRY: Duration = Duration::from_millis(100);

    /// Keys of epoch `e` as seen by A (`a = true`) or B.
    fn keys(e: u32, a: bool) -> SessionKeys {
        let k1 = [(e as u8).wrapping_add(1); 32];
        let k2 = [(e as u8).wrapping_add(101); 32];
        let (send, recv) = if a { (k1, k2) } else { (k2, k1) };
        SessionKeys {
            epoch: e,
            send,
            recv,
        }
    }

    /// A datagram from `ring` sealed on `epoch` (4-byte "header" as AAD).
    fn seal(ring: &mut KeyRing, epoch: u32) -> (u64, Vec<u8>) {
        let c = ring.next_counter(epoch).unwrap();
        let mut b = epoch.to_be_bytes().to_vec();
        b.extend_from_slice(b"data");
        ring.seal(epoch, c, &mut b, 4).unwrap();
        (c, b)
    }

    fn deliver(
        to: &mut KeyRing,
        now: Instant,
        epoch: u32,
        d: &(u64, Vec<u8>),
    ) -> Result<(), DropReason> {
        let mut copy = d.1.clone();
        to.open(now, epoch, d.0, &mut copy, 4)
            .map(|p| assert_eq!(p, b"data"))
    }

    #[test]
    fn sends_on_a_new_epoch_only_after_evidence() {
        let t0 = Instant::now();
        let mut a = KeyRing::new(&keys(0, true), OVERLAP, RETRY);
        let mut b = KeyRing::new(&keys(0, false), OVERLAP, RETRY);
        // B (the rekey responder) gets epoch 1 first and keeps sending on 0.
        assert!(b.install(t0, &keys(1, false)));
        assert_eq!(b.sending_epoch(), 0);
        assert_eq!(b.newest_epoch(), 1);
        let d = seal(&mut b, 0);
        assert_eq!(deliver(&mut a, t0, 0, &d), Ok(()));
        // B's KeyReady on epoch 1 is not due at once, and A could not open it yet anyway.
        assert_eq!(b.poll_key_ready(t0), None);
        assert_eq!(b.poll_key_ready(t0 + RETRY), Some(1));
        let early = seal(&mut b, 1);
        assert_eq!(
            deliver(&mut a, t0 + RETRY, 1, &early),
            Err(DropReason::UnknownEpoch)
        );
        // A gets epoch 1 one round trip later; its first datagram on epoch 1 is B's evidence.
        let t1 = t0 + Duration::from_millis(150);
        assert!(a.install(t1, &keys(1, true)));
        assert_eq!(a.sending_epoch(), 0);
        let ready = a.poll_key_ready(t1 + RETRY).unwrap();
        let d = seal(&mut a, ready);
        assert_eq!(deliver(&mut b, t1 + RETRY, 1, &d), Ok(()));
        assert_eq!(b.sending_epoch(), 1);
        assert_eq!(b.stats().switches, 1);
        assert_eq!(b.poll_key_ready(t1 + RETRY * 5), None);
        // B's answer on epoch 1 switches A.
        let d = seal(&mut b, 1);
        assert_eq!(deliver(&mut a, t1 + RETRY, 1, &d), Ok(()));
        assert_eq!(a.sending_epoch(), 1);
        assert_eq!(a.poll_key_ready(t1 + RETRY * 5), None);
        // Old epoch datagrams still in flight are accepted during the overlap only.
        let late = seal(&mut a, 0);
        assert_eq!(deliver(&mut b, t1 + RETRY, 0, &late), Ok(()));
        let t2 = t1 + RETRY + OVERLAP;
        assert_eq!(b.poll_timeout(), Some(t2));
        let late = seal(&mut a, 0);
        assert_eq!(deliver(&mut b, t2, 0, &late), Err(DropReason::StaleEpoch));
        b.expire(t2);
        assert_eq!(b.receiving_epochs(t2).collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn forged_or_replayed_datagrams_never_switch() {
        let t0 = Instant::now();
        let mut a = KeyRing::new(&keys(0, true), OVERLAP, RETRY);
        let mut b = KeyRing::new(&keys(0, false), OVERLAP, RETRY);
        a.install(t0, &keys(1, true));
        b.install(t0, &keys(1, false));
        let mut d = seal(&mut a, 1);
        d.1[6] ^= 1;
        assert_eq!(deliver(&mut b, t0, 1, &d), Err(DropReason::BadTag));
        assert_eq!(b.sending_epoch(), 0);
        let d = seal(&mut a, 1);
        assert_eq!(deliver(&mut b, t0, 1, &d), Ok(()));
        assert_eq!(deliver(&mut b, t0, 1, &d), Err(DropReason::Replayed));
        assert_eq!(b.stats().switches, 1);
    }

    #[test]
    fn keeps_at_most_four_epochs_and_never_the_sending_one_out() {
        let t0 = Instant::now();
        let mut b = KeyRing::new(&keys(0, false), OVERLAP, RETRY);
        for e in 1..=5 {
            assert!(b.install(t0, &keys(e, false)));
        }
        assert!(!b.install(t0, &keys(5, false)), "not newer");
        assert!(!b.install(t0, &keys(2, false)), "older");
        // Nothing proved the peer has any new epoch: still sending on 0, holding 0, 3, 4, 5.
        assert_eq!(b.sending_epoch(), 0);
        assert_eq!(b.receiving_epochs(t0).collect::<Vec<_>>(), vec![0, 3, 4, 5]);
        // Evidence on epoch 4 (the peer skipped 5 or has not got it): send on 4, keep 5 pending.
        let mut a = KeyRing::new(&keys(0, true), OVERLAP, RETRY);
        for e in 1..=4 {
            a.install(t0, &keys(e, true));
        }
        let d = seal(&mut a, 4);
        assert_eq!(deliver(&mut b, t0, 4, &d), Ok(()));
        assert_eq!(b.sending_epoch(), 4);
        assert_eq!(b.poll_key_ready(t0 + RETRY), Some(5));
        // Older epochs still accepted during the overlap, then gone.
        let d0 = seal(&mut a, 0);
        assert_eq!(deliver(&mut b, t0 + OVERLAP / 2, 0, &d0), Ok(()));
        b.expire(t0 + OVERLAP);
        assert_eq!(
            b.receiving_epochs(t0 + OVERLAP).collect::<Vec<_>>(),
            vec![4, 5]
        );
        assert_eq!(b.next_counter(0), Err(DropReason::StaleEpoch));
    }

    #[test]
    fn epochs_wrap() {
        let t0 = Instant::now();
        let mut a = KeyRing::new(&keys(u32::MAX, true), OVERLAP, RETRY);
        let mut b = KeyRing::new(&keys(u32::MAX, false), OVERLAP, RETRY);
        assert!(a.install(t0, &keys(0, true)));
        assert!(b.install(t0, &keys(0, false)));
        let d = seal(&mut a, 0);
        assert_eq!(deliver(&mut b, t0, 0, &d), Ok(()));
        assert_eq!(b.sending_epoch(), 0);
        let d = seal(&mut a, u32::MAX);
        assert_eq!(deliver(&mut b, t0, u32::MAX, &d), Ok(()));
        assert_eq!(b.sending_epoch(), 0, "an older epoch never switches back");
    }
}
