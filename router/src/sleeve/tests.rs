//! Two forwarders wired by hand (quinn's `Pair`): virtual time, latency, a path MTU that drops
//! oversized DF datagrams (and non-DF ones unless fragmentation works), optional loss.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::codec::{self, Header, MessageType, HEADER_LEN};
use super::*;

type Addr = u8;
const ADDR_A: Addr = 1;
const ADDR_B: Addr = 2;
const NAME_A: PeerName = PeerName::from_u64(0x0a0a_0a0a_0a0a);
const NAME_B: PeerName = PeerName::from_u64(0x0b0b_0b0b_0b0b);
const UID: u64 = 0x1234_5678_9abc_def0;

struct Side {
    fwd: Forwarder<Addr>,
    addr: Addr,
    events: Vec<ForwarderEvent>,
    frames: Vec<(PeerName, PeerName, Vec<u8>)>,
    results: Vec<Result<(), DropReason>>,
}

impl Side {
    fn has(&self, e: ForwarderEvent) -> bool {
        self.events.contains(&e)
    }
}

struct Packet {
    at: Instant,
    to_b: bool,
    from: Addr,
    data: Vec<u8>,
}

/// What the path does to one datagram (see [`Pair::filter`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Deliver,
    Drop,
    /// Deliver this much later than usual (so later datagrams overtake it).
    Delay(Duration),
}

/// Decides the fate of a datagram: (towards B?, its bytes).
type Filter = Box<dyn FnMut(bool, &[u8]) -> Fate>;

struct Pair {
    filter: Option<Filter>,
    time: Instant,
    latency: Duration,
    /// Largest datagram (UDP payload) the path carries unfragmented.
    mtu: usize,
    /// Do oversized non-DF datagrams (kernel fragmentation) get through?
    frag_ok: bool,
    /// Drop everything.
    blackhole: bool,
    /// Drop every n-th datagram.
    drop_every: Option<u64>,
    sent: u64,
    a: Side,
    b: Side,
    in_flight: VecDeque<Packet>,
    buf: Vec<u8>,
}

fn keys(epoch: u32) -> (SessionKeys, SessionKeys) {
    let k1 = [epoch as u8 + 1; 32];
    let k2 = [epoch as u8 + 101; 32];
    (
        SessionKeys {
            epoch,
            send: k1,
            recv: k2,
        },
        SessionKeys {
            epoch,
            send: k2,
            recv: k1,
        },
    )
}

impl Pair {
    fn with(encrypted: bool, cfg: impl Fn(&mut ForwarderConfig)) -> Pair {
        let time = Instant::now();
        let (ka, kb) = keys(0);
        let mut ca = ForwarderConfig::new(NAME_A, NAME_B, UID);
        let mut cb = ForwarderConfig::new(NAME_B, NAME_A, UID);
        cfg(&mut ca);
        cfg(&mut cb);
        let side = |fwd, addr| Side {
            fwd,
            addr,
            events: Vec::new(),
            frames: Vec::new(),
            results: Vec::new(),
        };
        Pair {
            filter: None,
            time,
            latency: Duration::from_millis(1),
            mtu: 1472,
            frag_ok: true,
            blackhole: false,
            drop_every: None,
            sent: 0,
            // A dialled B: it knows B's address; B learns A's from the first heartbeat.
            a: side(
                Forwarder::new(time, ca, encrypted.then_some(ka), Some(ADDR_B)),
                ADDR_A,
            ),
            b: side(
                Forwarder::new(time, cb, encrypted.then_some(kb), None),
                ADDR_B,
            ),
            in_flight: VecDeque::new(),
            buf: Vec::new(),
        }
    }

    fn new(encrypted: bool) -> Pair {
        Pair::with(encrypted, |_| {})
    }

    fn flush(&mut self) {
        for to_b in [true, false] {
            loop {
                let side = if to_b { &mut self.a } else { &mut self.b };
                let Some(t) = side.fwd.poll_transmit(self.time, &mut self.buf) else {
                    break;
                };
                assert_eq!(t.size, self.buf.len());
                assert!(t.size <= codec::MAX_UDP_PAYLOAD);
                if t.df && self.buf.get(1) == Some(&(MessageType::Data as u8)) {
                    let mtu = side.fwd.effective_mtu();
                    let limit = codec::datagram_len_for_mtu(mtu, side.fwd.is_encrypted());
                    assert!(t.size <= limit, "{} > {limit}", t.size);
                }
                let from = side.addr;
                let to = if to_b { self.b.addr } else { self.a.addr };
                self.sent += 1;
                let lost = t.destination != to
                    || self.blackhole
                    || self.drop_every.is_some_and(|n| self.sent.is_multiple_of(n))
                    || (t.size > self.mtu && (t.df || !self.frag_ok));
                let fate = match &mut self.filter {
                    Some(f) if !lost => f(to_b, &self.buf),
                    _ => Fate::Deliver,
                };
                let extra = match fate {
                    Fate::Deliver => Duration::ZERO,
                    Fate::Delay(d) => d,
                    Fate::Drop => continue,
                };
                if !lost {
                    self.in_flight.push_back(Packet {
                        at: self.time + self.latency + extra,
                        to_b,
                        from,
                        data: self.buf.clone(),
                    });
                }
            }
        }
        for side in [&mut self.a, &mut self.b] {
            while let Some(e) = side.fwd.poll_event() {
                side.events.push(e);
            }
        }
    }

    fn next_wakeup(&self) -> Option<Instant> {
        [
            self.in_flight.iter().map(|p| p.at).min(),
            self.a.fwd.poll_timeout(),
            self.b.fwd.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Advance to the next event, not past `end`. False when nothing is left before `end`.
    fn step(&mut self, end: Instant) -> bool {
        self.flush();
        let Some(next) = self.next_wakeup().filter(|t| *t <= end) else {
            self.time = self.time.max(end);
            return false;
        };
        self.time = self.time.max(next);
        let now = self.time;
        let mut later = VecDeque::new();
        while let Some(mut p) = self.in_flight.pop_front() {
            if p.at > now {
                later.push_back(p);
                continue;
            }
            let side = if p.to_b { &mut self.b } else { &mut self.a };
            let r = side.fwd.handle_datagram(now, p.from, &mut p.data);
            side.results.push(r.as_ref().map(|_| ()).map_err(|e| *e));
            if let Ok(Received::Frames(frames)) = r {
                for f in frames {
                    side.frames.push((f.src, f.dst, f.data.to_vec()));
                }
            }
        }
        self.in_flight = later;
        for side in [&mut self.a, &mut self.b] {
            if side.fwd.poll_timeout().is_some_and(|t| t <= now) {
                side.fwd.handle_timeout(now);
            }
        }
        self.flush();
        true
    }

    fn run_for(&mut self, d: Duration) {
        let end = self.time + d;
        while self.step(end) {}
    }

    fn establish(&mut self) {
        self.run_for(Duration::from_millis(100));
        assert!(self.a.fwd.is_established(), "a not established");
        assert!(self.b.fwd.is_established(), "b not established");
    }
}

fn eth(len: usize, fill: u8) -> Vec<u8> {
    vec![fill; len]
}

#[test]
fn establishes_via_heartbeats() {
    for encrypted in [false, true] {
        let mut p = Pair::new(encrypted);
        assert_eq!(
            p.b.fwd.queue_frame(NAME_B, NAME_A, &eth(60, 1), true),
            Err(DropReason::NoAddress)
        );
        p.establish();
        assert!(p.a.has(ForwarderEvent::Established));
        assert!(p.b.has(ForwarderEvent::Established));
        assert_eq!(p.b.fwd.remote_addr(), Some(&ADDR_A));
        assert!(p.a.results.iter().chain(&p.b.results).all(|r| r.is_ok()));
        assert_eq!(p.a.fwd.is_encrypted(), encrypted);
    }
}

#[test]
fn establishes_despite_loss() {
    let mut p = Pair::new(true);
    p.drop_every = Some(3);
    p.run_for(Duration::from_secs(5));
    assert!(p.a.fwd.is_established() && p.b.fwd.is_established());
}

#[test]
fn frames_round_trip() {
    for encrypted in [false, true] {
        let mut p = Pair::new(encrypted);
        p.establish();
        let third = PeerName::from_u64(0x0c);
        p.a.fwd
            .queue_frame(NAME_A, NAME_B, &eth(60, 1), true)
            .unwrap();
        // A relayed frame keeps its original source and final destination.
        p.a.fwd
            .queue_frame(third, NAME_B, &eth(100, 2), false)
            .unwrap();
        p.b.fwd
            .queue_frame(NAME_B, NAME_A, &eth(1400, 3), true)
            .unwrap();
        p.run_for(Duration::from_millis(10));
        assert_eq!(
            p.b.frames,
            vec![(NAME_A, NAME_B, eth(60, 1)), (third, NAME_B, eth(100, 2))]
        );
        assert_eq!(p.a.frames, vec![(NAME_B, NAME_A, eth(1400, 3))]);
        assert_eq!(p.b.fwd.drops().total(), 0);
    }
}

#[test]
fn batches_small_frames() {
    let mut p = Pair::new(true);
    p.establish();
    p.run_for(Duration::from_secs(60)); // PMTU settled, frag test done
    let before = p.a.fwd.stats().clone();
    for i in 0..10 {
        p.a.fwd
            .queue_frame(NAME_A, NAME_B, &eth(100, i), true)
            .unwrap();
    }
    p.flush();
    let after = p.a.fwd.stats().clone();
    assert_eq!(after.datagrams_sent - before.datagrams_sent, 1);
    assert_eq!(after.frames_sent - before.frames_sent, 10);
    // Full-size frames go one per datagram.
    for i in 0..3 {
        p.a.fwd
            .queue_frame(NAME_A, NAME_B, &eth(1000, i), true)
            .unwrap();
    }
    p.flush();
    assert_eq!(p.a.fwd.stats().datagrams_sent - after.datagrams_sent, 3);
    p.run_for(Duration::from_millis(10));
    assert_eq!(p.b.frames.len(), 13);
    // The batch limit applies too.
    let mut p = Pair::with(false, |c| c.max_batch_frames = 4);
    p.establish();
    let before = p.a.fwd.stats().clone();
    for i in 0..10 {
        p.a.fwd
            .queue_frame(NAME_A, NAME_B, &eth(20, i), false)
            .unwrap();
    }
    p.flush();
    assert_eq!(p.a.fwd.stats().datagrams_sent - before.datagrams_sent, 3);
}

#[test]
fn queue_limits() {
    let mut p = Pair::with(false, |c| c.queue_capacity = 2);
    p.establish();
    p.a.fwd.queue_frame(NAME_A, NAME_B, &[0; 10], true).unwrap();
    p.a.fwd.queue_frame(NAME_A, NAME_B, &[0; 10], true).unwrap();
    assert_eq!(
        p.a.fwd.queue_frame(NAME_A, NAME_B, &[0; 10], true),
        Err(DropReason::QueueFull)
    );
    let too_big = vec![0; p.a.fwd.max_frame_len(false) + 1];
    assert_eq!(
        p.a.fwd.queue_frame(NAME_A, NAME_B, &too_big, false),
        Err(DropReason::FrameTooBig)
    );
    assert_eq!(p.a.fwd.drops().get(DropReason::QueueFull), 1);
    assert_eq!(p.a.fwd.drops().get(DropReason::FrameTooBig), 1);
}

fn verified(side: &Side) -> Option<u16> {
    side.events.iter().rev().find_map(|e| match e {
        ForwarderEvent::PmtuVerified(m) => Some(*m),
        _ => None,
    })
}

#[test]
fn pmtu_converges_to_path_mtu() {
    // 1500-byte path: 1472-byte datagrams → overlay MTU 1400 encrypted, 1416 plain.
    for (encrypted, want) in [(true, 1400), (false, 1416)] {
        let mut p = Pair::new(encrypted);
        p.establish();
        assert_eq!(verified(&p.a), None);
        p.run_for(Duration::from_secs(60));
        assert_eq!(verified(&p.a), Some(want));
        assert_eq!(verified(&p.b), Some(want));
        assert_eq!(p.a.fwd.effective_mtu(), want);
        assert!(p.a.fwd.pmtu_verified());
        // A frame of exactly the MTU plus Ethernet header crosses the path.
        let max = p.a.fwd.max_frame_len(true);
        assert_eq!(max, usize::from(want) + codec::ETHERNET_HEADER_LEN);
        p.a.fwd
            .queue_frame(NAME_A, NAME_B, &eth(max, 9), true)
            .unwrap();
        p.run_for(Duration::from_millis(10));
        assert_eq!(p.b.frames.last().map(|f| f.2.len()), Some(max));
    }
}

#[test]
fn pmtu_capped_by_configuration() {
    let mut p = Pair::with(false, |c| c.max_mtu = 1438);
    p.mtu = 65535;
    p.establish();
    p.run_for(Duration::from_secs(1));
    assert_eq!(verified(&p.a), Some(1438));
}

#[test]
fn pmtu_hint_from_kernel() {
    let mut p = Pair::new(true);
    p.establish();
    p.a.fwd.note_path_mtu(p.time, 1500);
    p.run_for(Duration::from_millis(100));
    assert_eq!(verified(&p.a), Some(1400));
}

#[test]
fn fragmentation_test() {
    let mut p = Pair::new(false);
    p.establish();
    p.run_for(Duration::from_millis(50));
    assert!(p.a.has(ForwarderEvent::StackFragmentation(true)));
    assert!(p.a.fwd.stack_frag());
    let mut p = Pair::new(true);
    p.frag_ok = false;
    p.establish();
    p.run_for(Duration::from_secs(1));
    assert!(!p.a.fwd.stack_frag());
}

#[test]
fn heartbeat_timeout() {
    let mut p = Pair::new(true);
    p.establish();
    p.blackhole = true;
    p.run_for(Duration::from_secs(59));
    assert!(!p.a.has(ForwarderEvent::HeartbeatTimedOut));
    p.run_for(Duration::from_secs(2));
    assert!(p.a.has(ForwarderEvent::HeartbeatTimedOut));
    assert!(p.b.has(ForwarderEvent::HeartbeatTimedOut));
    assert!(p.a.fwd.is_closed());
    assert_eq!(p.a.fwd.poll_timeout(), None);
    assert_eq!(
        p.a.fwd.queue_frame(NAME_A, NAME_B, &[0; 10], true),
        Err(DropReason::Closed)
    );
}

#[test]
fn never_established_times_out() {
    let mut p = Pair::new(false);
    p.blackhole = true;
    p.run_for(Duration::from_secs(61));
    assert!(p.a.has(ForwarderEvent::HeartbeatTimedOut));
    assert!(!p.a.has(ForwarderEvent::Established));
}

/// One data datagram from A, captured instead of delivered.
fn capture_data(p: &mut Pair, payload: &[u8]) -> Vec<u8> {
    p.a.fwd.queue_frame(NAME_A, NAME_B, payload, true).unwrap();
    let mut buf = Vec::new();
    let t = p.a.fwd.poll_transmit(p.time, &mut buf).unwrap();
    assert_eq!(t.size, buf.len());
    assert_eq!(buf.get(1), Some(&(MessageType::Data as u8)));
    buf
}

#[test]
fn tampered_datagrams_are_dropped_and_counted() {
    let mut p = Pair::new(true);
    p.establish();
    let good = capture_data(&mut p, &eth(64, 7));
    let bits = good.len() * 8;
    let before = p.b.fwd.drops().total();
    for i in 0..bits {
        let mut bad = good.clone();
        bad[i / 8] ^= 1 << (i % 8);
        let r = p.b.fwd.handle_datagram(p.time, ADDR_A, &mut bad);
        assert!(r.is_err(), "bit {i} accepted");
    }
    assert_eq!(p.b.fwd.drops().total() - before, bits as u64);
    assert!(p.b.fwd.drops().get(DropReason::BadTag) > 0);
    // Truncations too.
    for n in 0..good.len() {
        let mut short = good[..n].to_vec();
        assert!(p.b.fwd.handle_datagram(p.time, ADDR_A, &mut short).is_err());
    }
    // The genuine datagram still goes through: forgeries never moved the replay window.
    let mut copy = good.clone();
    match p.b.fwd.handle_datagram(p.time, ADDR_A, &mut copy) {
        Ok(Received::Frames(f)) => assert_eq!(f.count(), 1),
        other => panic!("{other:?}"),
    }
}

#[test]
fn replayed_datagram_is_dropped() {
    let mut p = Pair::new(true);
    p.establish();
    let good = capture_data(&mut p, &eth(64, 7));
    let mut first = good.clone();
    assert!(p.b.fwd.handle_datagram(p.time, ADDR_A, &mut first).is_ok());
    let mut again = good.clone();
    assert_eq!(
        p.b.fwd
            .handle_datagram(p.time, ADDR_A, &mut again)
            .map(|_| ()),
        Err(DropReason::Replayed)
    );
    assert_eq!(p.b.fwd.drops().get(DropReason::Replayed), 1);
}

#[test]
fn old_epoch_accepted_during_overlap_then_rejected() {
    let mut p = Pair::new(true);
    p.establish();
    let old1 = capture_data(&mut p, &eth(64, 1));
    let old2 = capture_data(&mut p, &eth(64, 2));
    let (ka, kb) = keys(1);
    let t = p.time;
    p.a.fwd.rekey(t, ka);
    p.b.fwd.rekey(t, kb);
    let mut d = old1.clone();
    assert!(p.b.fwd.handle_datagram(t, ADDR_A, &mut d).is_ok());
    // New-epoch traffic flows both ways.
    p.a.fwd
        .queue_frame(NAME_A, NAME_B, &eth(64, 3), true)
        .unwrap();
    p.b.fwd
        .queue_frame(NAME_B, NAME_A, &eth(64, 4), true)
        .unwrap();
    p.run_for(Duration::from_secs(11));
    assert!(p.b.frames.iter().any(|f| f.2 == eth(64, 3)));
    assert!(p.a.frames.iter().any(|f| f.2 == eth(64, 4)));
    let mut d = old2.clone();
    assert_eq!(
        p.b.fwd.handle_datagram(p.time, ADDR_A, &mut d).map(|_| ()),
        Err(DropReason::StaleEpoch)
    );
    assert!(!p.b.fwd.is_closed());
}

#[test]
fn plaintext_and_encrypted_do_not_mix() {
    let mut p = Pair::new(false);
    p.establish();
    let plain = capture_data(&mut p, &eth(64, 1));
    let mut q = Pair::new(true);
    let mut d = plain.clone();
    assert_eq!(
        q.b.fwd.handle_datagram(q.time, ADDR_A, &mut d).map(|_| ()),
        Err(DropReason::WrongMode)
    );
    // Wrong receiver.
    let mut d = plain.clone();
    d[10] ^= 1;
    assert_eq!(
        p.b.fwd.handle_datagram(p.time, ADDR_A, &mut d).map(|_| ()),
        Err(DropReason::WrongPeer)
    );
}

#[test]
fn malformed_frames_after_good_ones_are_counted() {
    let mut p = Pair::new(false);
    p.establish();
    let mut d = capture_data(&mut p, &eth(64, 1));
    d.extend_from_slice(&[1, 2, 3]);
    match p.b.fwd.handle_datagram(p.time, ADDR_A, &mut d) {
        Ok(Received::Frames(f)) => assert_eq!(f.count(), 1),
        other => panic!("{other:?}"),
    }
    assert_eq!(p.b.fwd.drops().get(DropReason::TrailingGarbage), 1);
}

fn fresh(encrypted: bool) -> Forwarder<Addr> {
    let (_, kb) = keys(0);
    Forwarder::new(
        Instant::now(),
        ForwarderConfig::new(NAME_B, NAME_A, UID),
        encrypted.then_some(kb),
        None,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn arbitrary_datagrams_never_panic(
        encrypted in any::<bool>(),
        mut bytes in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut f = fresh(encrypted);
        let now = Instant::now();
        if let Ok(Received::Frames(frames)) = f.handle_datagram(now, ADDR_A, &mut bytes) {
            let _ = frames.count();
        }
        let mut buf = Vec::new();
        while f.poll_transmit(now, &mut buf).is_some() {}
    }

    #[test]
    fn plausible_headers_with_arbitrary_bodies_never_panic(
        kind in 0u8..7,
        counter in any::<u64>(),
        body in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut f = fresh(false);
        let now = Instant::now();
        let mut d = Vec::new();
        Header {
            kind: MessageType::from_u8(kind).unwrap(),
            encrypted: false,
            sender: NAME_A,
            receiver: NAME_B,
            epoch: 0,
            counter,
        }
        .write(&mut d);
        d.extend_from_slice(&body);
        let r = f.handle_datagram(now, ADDR_A, &mut d);
        if let Ok(Received::Frames(frames)) = r {
            let used: usize = frames.map(|fr| codec::frame_record_len(fr.data.len())).sum();
            prop_assert!(used + HEADER_LEN <= HEADER_LEN + body.len());
        }
        let mut buf = Vec::new();
        while f.poll_transmit(now, &mut buf).is_some() {}
        f.handle_timeout(now + Duration::from_secs(1));
    }

    #[test]
    fn random_batches_round_trip(
        encrypted in any::<bool>(),
        batch in proptest::collection::vec((any::<bool>(), 0usize..1500), 1..30),
    ) {
        let mut p = Pair::new(encrypted);
        p.mtu = codec::MAX_UDP_PAYLOAD; // the first probe verifies at once
        p.establish();
        p.run_for(Duration::from_secs(1));
        prop_assert!(p.a.fwd.pmtu_verified());
        let mut want = Vec::new();
        for (i, (df, len)) in batch.iter().enumerate() {
            let frame = eth((*len).min(p.a.fwd.max_frame_len(*df)), i as u8);
            p.a.fwd.queue_frame(NAME_A, NAME_B, &frame, *df).unwrap();
            want.push(frame);
        }
        p.run_for(Duration::from_millis(10));
        let mut got: Vec<_> = p.b.frames.iter().map(|f| f.2.clone()).collect();
        // DF frames go before non-DF ones; compare as multisets.
        got.sort();
        want.sort();
        prop_assert_eq!(got, want);
    }
}

#[test]
fn follows_peer_address_change() {
    let mut p = Pair::new(true);
    p.establish();
    // A's NAT mapping changes: B hears it from address 3 and moves there.
    p.a.addr = 3;
    p.run_for(Duration::from_secs(11));
    assert!(p.b.has(ForwarderEvent::RemoteAddressChanged));
    assert_eq!(p.b.fwd.remote_addr(), Some(&3));
    p.b.fwd
        .queue_frame(NAME_B, NAME_A, &eth(60, 5), true)
        .unwrap();
    p.run_for(Duration::from_millis(10));
    assert_eq!(p.a.frames, vec![(NAME_B, NAME_A, eth(60, 5))]);
    assert!(!p.a.has(ForwarderEvent::HeartbeatTimedOut));
}

fn numbered(seq: u32) -> Vec<u8> {
    let mut f = eth(64, 0);
    f[..4].copy_from_slice(&seq.to_be_bytes());
    f
}

fn seqs(side: &Side) -> Vec<u32> {
    let mut v: Vec<u32> = side
        .frames
        .iter()
        .filter_map(|f| f.2.first_chunk::<4>().map(|b| u32::from_be_bytes(*b)))
        .collect();
    v.sort_unstable();
    v
}

fn is_key_ready(d: &[u8]) -> bool {
    d.get(1) == Some(&(MessageType::KeyReady as u8))
}

/// Traffic both ways every millisecond for `ms` ms while both sides get `rekeys` new epochs,
/// B `b_first` before A each time (negative: A first), one rekey every `every`. Returns the
/// pair after the run: callers check what got through.
fn rekey_under_load(rekeys: u32, every: Duration, b_first: i64, filter: Option<Filter>) -> Pair {
    let mut p = Pair::new(true);
    p.latency = Duration::from_millis(2);
    p.filter = filter;
    p.establish();
    let start = p.time;
    let lead = Duration::from_millis(b_first.unsigned_abs());
    let mut schedule = Vec::new();
    for e in 1..=rekeys {
        let t = start + every * e;
        let (early, late) = if b_first >= 0 {
            (false, true)
        } else {
            (true, false)
        };
        // (when, to A?, epoch)
        schedule.push((t, early, e));
        schedule.push((t + lead, late, e));
    }
    schedule.sort_by_key(|s| s.0);
    let total = every * (rekeys + 1);
    let ms = total.as_millis() as u32;
    let mut next = 0;
    for seq in 0..ms {
        while let Some(&(t, to_a, e)) = schedule.get(next) {
            if t > p.time {
                break;
            }
            let (ka, kb) = keys(e);
            if to_a {
                p.a.fwd.rekey(p.time, ka);
            } else {
                p.b.fwd.rekey(p.time, kb);
            }
            next += 1;
        }
        p.a.fwd
            .queue_frame(NAME_A, NAME_B, &numbered(seq), true)
            .unwrap();
        p.b.fwd
            .queue_frame(NAME_B, NAME_A, &numbered(seq), true)
            .unwrap();
        p.run_for(Duration::from_millis(1));
    }
    p.run_for(Duration::from_millis(100));
    let all: Vec<u32> = (0..ms).collect();
    assert_eq!(seqs(&p.b), all, "frames lost A -> B");
    assert_eq!(seqs(&p.a), all, "frames lost B -> A");
    p
}

#[test]
fn rekey_at_different_instants_loses_nothing() {
    // B (the TCP rekey responder) a round trip ahead, A ahead, and far apart.
    for lead in [4, -4, 0, 300, -300] {
        let p = rekey_under_load(5, Duration::from_millis(700), lead, None);
        for side in [&p.a, &p.b] {
            assert_eq!(side.fwd.udp_epoch(), 5, "lead {lead}");
            assert_eq!(side.fwd.key_stats().switches, 5, "lead {lead}");
            assert_eq!(side.fwd.key_drops(), 0, "lead {lead}");
        }
    }
}

#[test]
fn rekey_survives_lost_delayed_and_reordered_key_ready() {
    // Every other KeyReady lost, the rest late enough for data to overtake them.
    let mut n = 0u32;
    let filter: Filter = Box::new(move |_, d| {
        if !is_key_ready(d) {
            return Fate::Deliver;
        }
        n += 1;
        match n % 3 {
            0 => Fate::Drop,
            1 => Fate::Delay(Duration::from_millis(40)),
            _ => Fate::Delay(Duration::from_millis(5)),
        }
    });
    let p = rekey_under_load(4, Duration::from_millis(900), 4, Some(filter));
    for side in [&p.a, &p.b] {
        assert_eq!(side.fwd.udp_epoch(), 4);
        assert_eq!(side.fwd.key_drops(), 0);
    }
}

#[test]
fn without_any_evidence_old_epoch_keeps_working() {
    // No KeyReady ever arrives and no data on the new epoch: nothing switches, nothing is lost.
    let filter: Filter = Box::new(|_, d| {
        if is_key_ready(d) {
            Fate::Drop
        } else {
            Fate::Deliver
        }
    });
    let p = rekey_under_load(6, Duration::from_millis(500), 4, Some(filter));
    for side in [&p.a, &p.b] {
        assert_eq!(side.fwd.udp_epoch(), 0);
        assert_eq!(side.fwd.key_stats().switches, 0);
    }
}

#[test]
fn key_ready_only_answers_with_evidence() {
    // Only B got the new keys: its KeyReady on epoch 1 cannot be opened by A, so A never
    // switches and B keeps sending on epoch 0 (retrying KeyReady).
    let mut p = Pair::new(true);
    p.establish();
    let (_, kb) = keys(1);
    p.b.fwd.rekey(p.time, kb);
    p.run_for(Duration::from_millis(350));
    assert_eq!(p.b.fwd.udp_epoch(), 0);
    assert_eq!(p.a.fwd.udp_epoch(), 0);
    assert!(
        p.a.fwd.drops().get(DropReason::EarlyKeyReady) >= 2,
        "KeyReady retried"
    );
    assert_eq!(p.a.fwd.key_drops() + p.b.fwd.key_drops(), 0);
    // A gets it; one exchange later both send on epoch 1.
    let (ka, _) = keys(1);
    p.a.fwd.rekey(p.time, ka);
    p.run_for(Duration::from_millis(150));
    assert_eq!((p.a.fwd.udp_epoch(), p.b.fwd.udp_epoch()), (1, 1));
}

#[test]
fn acks_count_only_for_probes_we_sent() {
    for encrypted in [false, true] {
        let mut p = Pair::new(encrypted);
        p.establish();
        p.run_for(Duration::from_secs(60));
        let mtu = p.a.fwd.effective_mtu();
        // Forged acks: an id never sent, an MTU above the configured one, a frag ack.
        for c in [
            Control::PmtuAck {
                id: 0xdead,
                mtu: 9000,
            },
            Control::PmtuAck {
                id: 0xdead,
                mtu: mtu + 1,
            },
            Control::FragAck { id: 0xdead },
        ] {
            let d = control_from_b(&mut p, c);
            let mut copy = d.clone();
            assert_eq!(
                p.a.fwd
                    .handle_datagram(p.time, ADDR_B, &mut copy)
                    .map(|_| ()),
                Err(DropReason::UnexpectedAck),
                "{c:?}"
            );
        }
        assert_eq!(p.a.fwd.effective_mtu(), mtu);
        assert_eq!(p.a.fwd.drops().get(DropReason::UnexpectedAck), 3);
    }
}

#[test]
fn acks_above_the_configured_mtu_are_refused() {
    // The peer acks every probe id, but with a bigger MTU than probed (or configured).
    let mut p = Pair::with(false, |c| c.max_mtu = 1400);
    p.mtu = 65535;
    p.filter = Some(Box::new(|to_b, d| {
        if !to_b && d.get(1) == Some(&(MessageType::PmtuAck as u8)) {
            Fate::Drop
        } else {
            Fate::Deliver
        }
    }));
    p.establish();
    // Probes went out: answer the first one with MTU 9000 (same id).
    let sent = p.a.fwd.config().probe_seed;
    let d = control_from_b(
        &mut p,
        Control::PmtuAck {
            id: sent,
            mtu: 9000,
        },
    );
    let mut copy = d.clone();
    assert_eq!(
        p.a.fwd
            .handle_datagram(p.time, ADDR_B, &mut copy)
            .map(|_| ()),
        Err(DropReason::UnexpectedAck)
    );
    p.run_for(Duration::from_secs(5));
    assert!(p.a.fwd.effective_mtu() <= 1400);
}

/// A control datagram from B to A, built the way B's forwarder would (plaintext only when
/// the pair is plaintext; encrypted ones go through B's forwarder to be sealed).
fn control_from_b(p: &mut Pair, c: Control) -> Vec<u8> {
    if p.b.fwd.is_encrypted() {
        return p.b.fwd.sealed_control_for_test(c);
    }
    let mut d = Vec::new();
    Header {
        kind: c.kind(),
        encrypted: false,
        sender: NAME_B,
        receiver: NAME_A,
        epoch: 0,
        counter: 1 << 40,
    }
    .write(&mut d);
    c.write_body(&mut d, false);
    d
}

#[test]
fn plaintext_pinned_accepts_only_the_known_address() {
    let time = Instant::now();
    let mut cb = ForwarderConfig::new(NAME_B, NAME_A, UID);
    cb.pin_remote_addr = true;
    let mut b: Forwarder<Addr> = Forwarder::new(time, cb, None, Some(ADDR_A));
    let hb = Control::Heartbeat {
        conn_uid: UID,
        heard: true,
        established: true,
    };
    let mut p = Pair::new(false);
    let d = control_from_b(&mut p, hb);
    // Re-address it A -> B.
    let mut d2 = d.clone();
    d2[4..10].copy_from_slice(&NAME_A.to_bytes());
    d2[10..16].copy_from_slice(&NAME_B.to_bytes());
    let mut copy = d2.clone();
    assert_eq!(
        b.handle_datagram(time, 9, &mut copy).map(|_| ()),
        Err(DropReason::WrongAddress)
    );
    assert!(!b.is_established());
    assert_eq!(b.remote_addr(), Some(&ADDR_A));
    let mut copy = d2.clone();
    assert!(b.handle_datagram(time, ADDR_A, &mut copy).is_ok());
    assert!(b.is_established());
    // A data datagram from elsewhere is dropped too.
    let mut data = Vec::new();
    Header {
        kind: MessageType::Data,
        encrypted: false,
        sender: NAME_A,
        receiver: NAME_B,
        epoch: 0,
        counter: 5,
    }
    .write(&mut data);
    codec::write_frame(&mut data, NAME_A, NAME_B, &eth(60, 1)).unwrap();
    let mut copy = data.clone();
    assert_eq!(
        b.handle_datagram(time, 7, &mut copy).map(|_| ()),
        Err(DropReason::WrongAddress)
    );
    let mut copy = data.clone();
    assert!(matches!(
        b.handle_datagram(time, ADDR_A, &mut copy),
        Ok(Received::Frames(_))
    ));
}
