//! The per-peer-connection UDP state machine (spec §4.7, §4.8), quinn-proto style: no sockets and
//! no clock. Inputs: [`Forwarder::handle_datagram`], [`Forwarder::queue_frame`],
//! [`Forwarder::handle_timeout`], [`Forwarder::rekey`], [`Forwarder::note_path_mtu`]. Outputs,
//! drained after every input: [`Forwarder::poll_transmit`] until `None`,
//! [`Forwarder::poll_event`] until `None`, then arm one timer at [`Forwarder::poll_timeout`].
//!
//! Establishment is decided over UDP alone: each heartbeat carries a "heard you" flag, and a side
//! is established once it has received a valid heartbeat whose flag says the peer hears us (so
//! UDP works both ways). Acks for PMTU probes and fragmentation tests also travel over UDP; they
//! count only when they echo the id of a probe we sent (and never above the configured MTU).
//!
//! Rekeying: [`KeyRing`] (new epochs are sent on only once the peer proved it has them).
//! Plaintext (trusted) connections with [`ForwarderConfig::pin_remote_addr`] accept datagrams
//! only from the address the mesh connection gave: nothing authenticates them otherwise.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::codec::{
    self, datagram_len_for_mtu, Control, Frames, Header, MessageType, HEADER_LEN, MAX_UDP_PAYLOAD,
    TAG_LEN,
};
use super::crypto::SessionKeys;
use super::keyring::{KeyRing, KeyStats};
use super::{DropCounters, DropReason, PeerName};

/// Most unanswered PMTU probes remembered (their acks are accepted).
const MAX_PROBES: usize = 16;

/// Static parameters of one forwarder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwarderConfig {
    pub local: PeerName,
    pub remote: PeerName,
    /// Connection UID (local XOR remote connection ids), carried in heartbeats.
    pub conn_uid: u64,
    /// Upper bound of PMTU discovery, as an overlay MTU (capped to what fits in 65507 bytes).
    pub max_mtu: u16,
    /// Lower bound of PMTU discovery, assumed to work (552).
    pub min_mtu: u16,
    /// Heartbeat interval until established (500 ms).
    pub heartbeat_fast: Duration,
    /// Heartbeat interval once established (10 s).
    pub heartbeat_slow: Duration,
    /// No valid heartbeat for this long → [`ForwarderEvent::HeartbeatTimedOut`] (60 s).
    pub heartbeat_timeout: Duration,
    /// First PMTU probe retry interval, doubled per retry (10 ms).
    pub pmtu_probe_timeout: Duration,
    /// Probes per candidate before it counts as too big (8).
    pub pmtu_max_probes: u8,
    /// Fragmentation test interval once established (5 min).
    pub frag_test_interval: Duration,
    /// Most frames per datagram (100).
    pub max_batch_frames: usize,
    /// Frames queued per path (DF / non-DF) before `queue_frame` says QueueFull.
    pub queue_capacity: usize,
    /// How long an older receive epoch stays valid after we moved to a newer one.
    pub rekey_overlap: Duration,
    /// `KeyReady` retry interval while a newer epoch is not sent on yet.
    pub key_ready_retry: Duration,
    /// First PMTU/fragmentation probe id (random per connection, so that a blind sender
    /// cannot guess which acks we wait for).
    pub probe_seed: u32,
    /// Accept datagrams only from the remote address given at creation, and never move it
    /// (plaintext mode: nothing else authenticates the sender).
    pub pin_remote_addr: bool,
}

impl ForwarderConfig {
    /// Defaults from the spec for a connection `local` ↔ `remote`.
    pub fn new(local: PeerName, remote: PeerName, conn_uid: u64) -> Self {
        ForwarderConfig {
            local,
            remote,
            conn_uid,
            max_mtu: u16::MAX,
            min_mtu: 552,
            heartbeat_fast: Duration::from_millis(500),
            heartbeat_slow: Duration::from_secs(10),
            heartbeat_timeout: Duration::from_secs(60),
            pmtu_probe_timeout: Duration::from_millis(10),
            pmtu_max_probes: 8,
            frag_test_interval: Duration::from_secs(300),
            max_batch_frames: 100,
            queue_capacity: 64,
            rekey_overlap: Duration::from_secs(10),
            key_ready_retry: Duration::from_millis(100),
            // Not secret: only makes ids differ between connections; the shell sets a random one.
            probe_seed: (conn_uid ^ (conn_uid >> 32)) as u32,
            pin_remote_addr: false,
        }
    }
}

/// Something the shell should know about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwarderEvent {
    /// UDP works both ways (first time only).
    Established,
    /// PMTU discovery finished: this overlay MTU is verified (or is the floor).
    PmtuVerified(u16),
    /// No valid heartbeat for `heartbeat_timeout`: tear the connection down. The forwarder is
    /// closed afterwards.
    HeartbeatTimedOut,
    /// A valid heartbeat came from a new address, now used for sending.
    RemoteAddressChanged,
    /// Result of a fragmentation test: true when the peer received our fragmented datagram.
    StackFragmentation(bool),
}

/// One datagram to send; its bytes are in the `Vec` passed to `poll_transmit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit<A> {
    pub destination: A,
    pub size: usize,
    /// Send with DF set (the PMTU-limited path) rather than letting the kernel fragment.
    pub df: bool,
}

/// What a valid datagram carried.
#[derive(Debug)]
pub enum Received<'a> {
    /// Data frames to inject or relay (each names its original source and final destination).
    /// Frames before a malformed record are delivered; the malformation was already counted.
    Frames(Frames<'a>),
    /// A control message, consumed by the forwarder (poll transmits and events next).
    Control,
}

#[derive(Debug)]
enum Pmtu {
    /// Not started (before establishment): optimistic, the configured maximum.
    Idle,
    Probing {
        candidate: u16,
        sent: u8,
        deadline: Instant,
        interval: Duration,
    },
    Verified,
}

#[derive(Debug, Default)]
struct FrameQueue {
    records: VecDeque<Vec<u8>>,
    spare: Vec<Vec<u8>>,
}

impl FrameQueue {
    fn clear(&mut self) {
        while let Some(r) = self.records.pop_front() {
            self.spare.push(r);
        }
    }
}

/// Traffic counters for status and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForwarderStats {
    pub datagrams_sent: u64,
    pub frames_sent: u64,
    pub datagrams_received: u64,
    pub frames_received: u64,
}

/// The UDP state of one peer connection. `A` is the shell's opaque destination handle (a
/// `SocketAddr`, or an index).
#[derive(Debug)]
pub struct Forwarder<A> {
    cfg: ForwarderConfig,
    remote_addr: Option<A>,
    keys: Option<KeyRing>,
    plain_counter: u64,
    heard: bool,
    established: bool,
    closed: bool,
    heartbeat_deadline: Instant,
    next_heartbeat: Instant,
    heartbeat_interval: Duration,
    /// Lower bound (assumed/verified) and upper bound of the PMTU search, as overlay MTUs.
    pmtu_lo: u16,
    pmtu_hi: u16,
    pmtu: Pmtu,
    next_frag_test: Option<Instant>,
    stack_frag: bool,
    next_probe_id: u32,
    /// PMTU probes sent and not answered yet (id, mtu), oldest first, at most [`MAX_PROBES`].
    pmtu_outstanding: VecDeque<(u32, u16)>,
    /// The id of the last fragmentation test, until answered.
    frag_outstanding: Option<u32>,
    control: VecDeque<(Control, bool)>,
    df_queue: FrameQueue,
    nondf_queue: FrameQueue,
    events: VecDeque<ForwarderEvent>,
    drops: DropCounters,
    stats: ForwarderStats,
}

impl<A: Clone + PartialEq> Forwarder<A> {
    /// A confirmed forwarder. `keys` is None in plaintext (trusted subnets) mode. `remote_addr`
    /// is known on the dialling side (the peer's TCP address); the accepting side learns it from
    /// the first valid heartbeat. Sends a heartbeat at once if the address is known.
    pub fn new(
        now: Instant,
        cfg: ForwarderConfig,
        keys: Option<SessionKeys>,
        remote_addr: Option<A>,
    ) -> Self {
        let encrypted = keys.is_some();
        let cap = codec::mtu_for_datagram_len(MAX_UDP_PAYLOAD, encrypted);
        let hi = cfg.max_mtu.min(cap);
        let lo = cfg.min_mtu.min(hi);
        let keys = keys.map(|k| KeyRing::new(&k, cfg.rekey_overlap, cfg.key_ready_retry));
        let mut f = Forwarder {
            next_probe_id: cfg.probe_seed,
            heartbeat_deadline: now + cfg.heartbeat_timeout,
            next_heartbeat: now + cfg.heartbeat_fast,
            heartbeat_interval: cfg.heartbeat_fast,
            cfg,
            remote_addr,
            keys,
            plain_counter: 0,
            heard: false,
            established: false,
            closed: false,
            pmtu_lo: lo,
            pmtu_hi: hi,
            pmtu: Pmtu::Idle,
            next_frag_test: None,
            stack_frag: false,
            pmtu_outstanding: VecDeque::new(),
            frag_outstanding: None,
            control: VecDeque::new(),
            df_queue: FrameQueue::default(),
            nondf_queue: FrameQueue::default(),
            events: VecDeque::new(),
            drops: DropCounters::default(),
            stats: ForwarderStats::default(),
        };
        if f.remote_addr.is_some() {
            f.queue_heartbeat();
        }
        f
    }

    pub fn config(&self) -> &ForwarderConfig {
        &self.cfg
    }

    pub fn is_encrypted(&self) -> bool {
        self.keys.is_some()
    }

    /// The key epoch we send on (0 in plaintext mode).
    pub fn udp_epoch(&self) -> u32 {
        self.keys.as_ref().map_or(0, KeyRing::sending_epoch)
    }

    /// Key epoch counters (all 0 in plaintext mode).
    pub fn key_stats(&self) -> KeyStats {
        self.keys.as_ref().map(KeyRing::stats).unwrap_or_default()
    }

    /// Datagrams dropped because of their key epoch (too old or not known yet), but for
    /// `KeyReady` sent before we had its epoch.
    pub fn key_drops(&self) -> u64 {
        self.drops.get(DropReason::StaleEpoch) + self.drops.get(DropReason::UnknownEpoch)
    }

    pub fn is_established(&self) -> bool {
        self.established
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    pub fn remote_addr(&self) -> Option<&A> {
        self.remote_addr.as_ref()
    }

    /// Does kernel fragmentation of our datagrams reach the peer (last frag test)?
    pub fn stack_frag(&self) -> bool {
        self.stack_frag
    }

    /// The overlay MTU frames are held to on the DF path: the verified value once PMTU
    /// discovery finished, else the current upper bound (optimistic, as Weave).
    pub fn effective_mtu(&self) -> u16 {
        match self.pmtu {
            Pmtu::Verified => self.pmtu_lo,
            Pmtu::Idle | Pmtu::Probing { .. } => self.pmtu_hi,
        }
    }

    /// Whether the effective MTU has been verified by an acked probe.
    pub fn pmtu_verified(&self) -> bool {
        matches!(self.pmtu, Pmtu::Verified)
    }

    pub fn drops(&self) -> &DropCounters {
        &self.drops
    }

    pub fn stats(&self) -> &ForwarderStats {
        &self.stats
    }

    /// Largest frame accepted by `queue_frame` on the given path.
    pub fn max_frame_len(&self, df: bool) -> usize {
        let limit = self.datagram_limit(df);
        limit.saturating_sub(HEADER_LEN + self.tag_len() + codec::FRAME_HEADER_LEN)
    }

    fn tag_len(&self) -> usize {
        if self.is_encrypted() {
            TAG_LEN
        } else {
            0
        }
    }

    fn datagram_limit(&self, df: bool) -> usize {
        if df {
            datagram_len_for_mtu(self.effective_mtu(), self.is_encrypted()).min(MAX_UDP_PAYLOAD)
        } else {
            MAX_UDP_PAYLOAD
        }
    }

    // ---- inputs ----

    /// Install new keys (rekey / password rotation): received on at once, sent on once the
    /// peer proved it has them ([`KeyRing`]). Ignored in plaintext mode and for epochs that are
    /// not newer than every one held.
    pub fn rekey(&mut self, now: Instant, keys: SessionKeys) {
        if let Some(ring) = &mut self.keys {
            ring.install(now, &keys);
        }
    }

    /// The kernel reported path MTU `pmtu` (EMSGSIZE on the DF socket): lower the upper bound
    /// and (re)start verification.
    pub fn note_path_mtu(&mut self, now: Instant, pmtu: u16) {
        let dgram = usize::from(pmtu).saturating_sub(codec::IP_UDP_OVERHEAD);
        let candidate =
            codec::mtu_for_datagram_len(dgram, self.is_encrypted()).max(self.cfg.min_mtu);
        if candidate >= self.pmtu_hi && !matches!(self.pmtu, Pmtu::Idle) {
            return;
        }
        self.pmtu_hi = candidate.min(self.pmtu_hi);
        self.pmtu_lo = self.pmtu_lo.min(self.pmtu_hi);
        if self.established {
            self.start_pmtu(now);
        }
    }

    /// Restart PMTU discovery from the configured bounds (e.g. after a route change).
    pub fn restart_pmtu_discovery(&mut self, now: Instant) {
        let cap = codec::mtu_for_datagram_len(MAX_UDP_PAYLOAD, self.is_encrypted());
        self.pmtu_hi = self.cfg.max_mtu.min(cap);
        self.pmtu_lo = self.cfg.min_mtu.min(self.pmtu_hi);
        self.start_pmtu(now);
    }

    /// Queue one captured or relayed frame (`src` = capturing peer, `dst` = final destination
    /// peer). `df`: the DF path (held to the effective MTU) or the kernel-fragmented path.
    pub fn queue_frame(
        &mut self,
        src: PeerName,
        dst: PeerName,
        frame: &[u8],
        df: bool,
    ) -> Result<(), DropReason> {
        let r = self.queue_frame_inner(src, dst, frame, df);
        if let Err(reason) = r {
            self.drops.record(reason);
        }
        r
    }

    fn queue_frame_inner(
        &mut self,
        src: PeerName,
        dst: PeerName,
        frame: &[u8],
        df: bool,
    ) -> Result<(), DropReason> {
        if self.closed {
            return Err(DropReason::Closed);
        }
        if self.remote_addr.is_none() {
            return Err(DropReason::NoAddress);
        }
        if frame.len() > self.max_frame_len(df) {
            return Err(DropReason::FrameTooBig);
        }
        let cap = self.cfg.queue_capacity;
        let q = if df {
            &mut self.df_queue
        } else {
            &mut self.nondf_queue
        };
        if q.records.len() >= cap {
            return Err(DropReason::QueueFull);
        }
        let mut rec = q.spare.pop().unwrap_or_default();
        rec.clear();
        codec::write_frame(&mut rec, src, dst, frame).map_err(|_| DropReason::FrameTooBig)?;
        q.records.push_back(rec);
        Ok(())
    }

    /// Frames queued and not yet sent.
    pub fn queued_frames(&self) -> usize {
        self.df_queue.records.len() + self.nondf_queue.records.len()
    }

    /// Process one received datagram from `from`, decrypting in place. Drops are counted.
    pub fn handle_datagram<'a>(
        &mut self,
        now: Instant,
        from: A,
        datagram: &'a mut [u8],
    ) -> Result<Received<'a>, DropReason> {
        let r = self.handle_datagram_inner(now, from, datagram);
        match &r {
            Ok(_) => self.stats.datagrams_received += 1,
            Err(reason) => self.drops.record(*reason),
        }
        r
    }

    fn handle_datagram_inner<'a>(
        &mut self,
        now: Instant,
        from: A,
        datagram: &'a mut [u8],
    ) -> Result<Received<'a>, DropReason> {
        if self.closed {
            return Err(DropReason::Closed);
        }
        let header = Header::parse(datagram)?;
        if header.encrypted != self.is_encrypted() {
            return Err(DropReason::WrongMode);
        }
        if header.sender != self.cfg.remote || header.receiver != self.cfg.local {
            return Err(DropReason::WrongPeer);
        }
        if self.cfg.pin_remote_addr && self.remote_addr.as_ref() != Some(&from) {
            return Err(DropReason::WrongAddress);
        }
        let body: &'a mut [u8] = match &mut self.keys {
            Some(keys) => keys
                .open(now, header.epoch, header.counter, datagram, HEADER_LEN)
                .map_err(|e| match (e, header.kind) {
                    // The peer got the keys first; not a data loss, so not a key drop.
                    (DropReason::UnknownEpoch, MessageType::KeyReady) => DropReason::EarlyKeyReady,
                    (e, _) => e,
                })?,
            None => datagram.get_mut(HEADER_LEN..).ok_or(DropReason::TooShort)?,
        };
        let body: &'a [u8] = body;
        if header.kind == MessageType::Data {
            let frames = codec::frames(body);
            let (n, err) = frames.validate();
            self.stats.frames_received += n as u64;
            if let Some(e) = err {
                self.drops.record(e.into());
            }
            return Ok(Received::Frames(frames));
        }
        let control = Control::parse(header.kind, body, header.encrypted)?;
        self.handle_control(now, from, control)?;
        Ok(Received::Control)
    }

    fn handle_control(
        &mut self,
        now: Instant,
        from: A,
        control: Control,
    ) -> Result<(), DropReason> {
        match control {
            Control::Heartbeat {
                conn_uid,
                heard,
                established: peer_established,
            } => {
                if conn_uid != self.cfg.conn_uid {
                    return Err(DropReason::WrongConnection);
                }
                self.heartbeat_deadline = now + self.cfg.heartbeat_timeout;
                match &self.remote_addr {
                    Some(a) if *a == from => {}
                    Some(_) => {
                        self.remote_addr = Some(from);
                        self.events.push_back(ForwarderEvent::RemoteAddressChanged);
                    }
                    None => self.remote_addr = Some(from),
                }
                if !self.heard || !peer_established {
                    // Tell the peer at once that we hear it (again, while it does not know
                    // yet: our previous answer may have been lost). One reply per heartbeat.
                    self.heard = true;
                    self.queue_heartbeat();
                }
                if heard && !self.established {
                    self.established = true;
                    self.events.push_back(ForwarderEvent::Established);
                    self.heartbeat_interval = self.cfg.heartbeat_slow;
                    self.next_heartbeat = now + self.heartbeat_interval;
                    self.start_pmtu(now);
                    self.start_frag_test(now);
                }
            }
            Control::PmtuProbe { id, mtu } => self
                .control
                .push_back((Control::PmtuAck { id, mtu }, false)),
            Control::PmtuAck { id, mtu } => {
                let i = self
                    .pmtu_outstanding
                    .iter()
                    .position(|p| *p == (id, mtu))
                    .filter(|_| mtu <= self.mtu_cap())
                    .ok_or(DropReason::UnexpectedAck)?;
                self.pmtu_outstanding.remove(i);
                self.pmtu_acked(now, mtu);
            }
            Control::FragTest { id } => self.control.push_back((Control::FragAck { id }, false)),
            Control::FragAck { id } => {
                if self.frag_outstanding != Some(id) {
                    return Err(DropReason::UnexpectedAck);
                }
                self.frag_outstanding = None;
                if !self.stack_frag {
                    self.stack_frag = true;
                    self.events
                        .push_back(ForwarderEvent::StackFragmentation(true));
                }
            }
            // The switch itself happened when the datagram opened (KeyRing::open); answer so
            // the peer gets its evidence even when no data flows.
            Control::KeyReady { ack: false } => self
                .control
                .push_back((Control::KeyReady { ack: true }, false)),
            Control::KeyReady { ack: true } => {}
        }
        Ok(())
    }

    /// Run timers that are due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.closed {
            return;
        }
        if now >= self.heartbeat_deadline {
            self.close();
            self.events.push_back(ForwarderEvent::HeartbeatTimedOut);
            return;
        }
        if now >= self.next_heartbeat {
            if self.remote_addr.is_some() {
                self.queue_heartbeat();
            }
            self.next_heartbeat = now + self.heartbeat_interval;
        }
        if let Some(at) = self.next_frag_test {
            if now >= at {
                self.start_frag_test(now);
            }
        }
        self.pmtu_tick(now);
        self.key_tick(now);
    }

    fn key_tick(&mut self, now: Instant) {
        if let Some(keys) = &mut self.keys {
            keys.expire(now);
            if keys.poll_key_ready(now).is_some() && self.remote_addr.is_some() {
                self.control
                    .push_back((Control::KeyReady { ack: false }, false));
            }
        }
    }

    /// Stop: drop queued frames, no more timers or transmits.
    pub fn close(&mut self) {
        self.closed = true;
        self.control.clear();
        self.df_queue.clear();
        self.nondf_queue.clear();
    }

    // ---- outputs ----

    /// The next deadline at which `handle_timeout` must be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closed {
            return None;
        }
        let mut t = self.heartbeat_deadline.min(self.next_heartbeat);
        if let Pmtu::Probing { deadline, .. } = self.pmtu {
            t = t.min(deadline);
        }
        if let Some(at) = self.next_frag_test {
            t = t.min(at);
        }
        if let Some(at) = self.keys.as_ref().and_then(KeyRing::poll_timeout) {
            t = t.min(at);
        }
        Some(t)
    }

    #[must_use]
    pub fn poll_event(&mut self) -> Option<ForwarderEvent> {
        self.events.pop_front()
    }

    /// Write the next datagram into `buf` (cleared first). Control messages go first, then the
    /// DF queue, then the non-DF queue; data datagrams batch as many queued frames as fit.
    /// Call until `None` after every input.
    #[must_use]
    pub fn poll_transmit(&mut self, _now: Instant, buf: &mut Vec<u8>) -> Option<Transmit<A>> {
        if self.closed {
            return None;
        }
        let destination = self.remote_addr.clone()?;
        loop {
            buf.clear();
            if let Some((control, df)) = self.control.pop_front() {
                let control = match control {
                    Control::Heartbeat { .. } => Control::Heartbeat {
                        conn_uid: self.cfg.conn_uid,
                        heard: self.heard,
                        established: self.established,
                    },
                    other => other,
                };
                let encrypted = self.is_encrypted();
                // A KeyReady announces the newest epoch: it goes on that epoch.
                let epoch = match (&self.keys, control) {
                    (Some(k), Control::KeyReady { ack: false }) => k.newest_epoch(),
                    _ => self.udp_epoch(),
                };
                let sealed = self
                    .begin_datagram(buf, control.kind(), epoch)
                    .and_then(|counter| {
                        control.write_body(buf, encrypted);
                        self.finish_datagram(buf, epoch, counter)
                    });
                match sealed {
                    Ok(size) => {
                        self.stats.datagrams_sent += 1;
                        return Some(Transmit {
                            destination,
                            size,
                            df,
                        });
                    }
                    Err(reason) => {
                        self.drops.record(reason);
                        continue;
                    }
                }
            }
            let df = !self.df_queue.records.is_empty();
            if !df && self.nondf_queue.records.is_empty() {
                return None;
            }
            let limit = self.datagram_limit(df);
            let tag = self.tag_len();
            let max_frames = self.cfg.max_batch_frames.max(1);
            let queue = if df {
                &mut self.df_queue
            } else {
                &mut self.nondf_queue
            };
            // Frames that no longer fit (the MTU shrank since they were queued) are dropped.
            let mut too_big = 0u64;
            while queue
                .records
                .front()
                .is_some_and(|r| HEADER_LEN + r.len() + tag > limit)
            {
                if let Some(r) = queue.records.pop_front() {
                    queue.spare.push(r);
                }
                too_big += 1;
            }
            for _ in 0..too_big {
                self.drops.record(DropReason::FrameTooBig);
            }
            let queue = if df {
                &mut self.df_queue
            } else {
                &mut self.nondf_queue
            };
            if queue.records.is_empty() {
                continue;
            }
            let mut body_len = 0;
            let mut n = 0;
            for r in queue.records.iter().take(max_frames) {
                if HEADER_LEN + body_len + r.len() + tag > limit {
                    break;
                }
                body_len += r.len();
                n += 1;
            }
            let epoch = self.udp_epoch();
            let counter = match self.begin_datagram(buf, MessageType::Data, epoch) {
                Ok(c) => c,
                Err(reason) => {
                    self.drop_queued(df, n, reason);
                    continue;
                }
            };
            let queue = if df {
                &mut self.df_queue
            } else {
                &mut self.nondf_queue
            };
            for _ in 0..n {
                if let Some(r) = queue.records.pop_front() {
                    buf.extend_from_slice(&r);
                    queue.spare.push(r);
                }
            }
            match self.finish_datagram(buf, epoch, counter) {
                Ok(size) => {
                    self.stats.datagrams_sent += 1;
                    self.stats.frames_sent += n as u64;
                    return Some(Transmit {
                        destination,
                        size,
                        df,
                    });
                }
                Err(reason) => {
                    for _ in 0..n {
                        self.drops.record(reason);
                    }
                }
            }
        }
    }

    fn drop_queued(&mut self, df: bool, n: usize, reason: DropReason) {
        let queue = if df {
            &mut self.df_queue
        } else {
            &mut self.nondf_queue
        };
        for _ in 0..n {
            if let Some(r) = queue.records.pop_front() {
                queue.spare.push(r);
            }
        }
        for _ in 0..n {
            self.drops.record(reason);
        }
    }

    /// Clear `buf` and write a header with the next counter of `epoch` (ignored in plaintext
    /// mode); returns the counter.
    fn begin_datagram(
        &mut self,
        buf: &mut Vec<u8>,
        kind: MessageType,
        epoch: u32,
    ) -> Result<u64, DropReason> {
        let encrypted = self.is_encrypted();
        let (epoch, counter) = match &mut self.keys {
            Some(k) => (epoch, k.next_counter(epoch)?),
            None => {
                let c = self.plain_counter;
                self.plain_counter = self.plain_counter.wrapping_add(1);
                (0, c)
            }
        };
        let header = Header {
            kind,
            encrypted,
            sender: self.cfg.local,
            receiver: self.cfg.remote,
            epoch,
            counter,
        };
        buf.clear();
        header.write(buf);
        Ok(counter)
    }

    /// Seal the body after the header when encrypted. Returns the datagram size.
    fn finish_datagram(
        &mut self,
        buf: &mut Vec<u8>,
        epoch: u32,
        counter: u64,
    ) -> Result<usize, DropReason> {
        match &mut self.keys {
            Some(k) => k.seal(epoch, counter, buf, HEADER_LEN),
            None => Ok(buf.len()),
        }
    }

    /// A control datagram as `poll_transmit` would seal it now (tests forge acks with it).
    #[cfg(test)]
    pub(crate) fn sealed_control_for_test(&mut self, c: Control) -> Vec<u8> {
        let mut buf = Vec::new();
        let epoch = self.udp_epoch();
        let encrypted = self.is_encrypted();
        if let Ok(counter) = self.begin_datagram(&mut buf, c.kind(), epoch) {
            c.write_body(&mut buf, encrypted);
            let _ = self.finish_datagram(&mut buf, epoch, counter);
        }
        buf
    }

    // ---- heartbeats, PMTU, frag test ----

    fn queue_heartbeat(&mut self) {
        // The flag is filled in when sent; one pending heartbeat is enough.
        if !self
            .control
            .iter()
            .any(|(c, _)| matches!(c, Control::Heartbeat { .. }))
        {
            self.control.push_back((
                Control::Heartbeat {
                    conn_uid: self.cfg.conn_uid,
                    heard: false,
                    established: false,
                },
                true,
            ));
        }
    }

    fn probe_id(&mut self) -> u32 {
        let id = self.next_probe_id;
        self.next_probe_id = self.next_probe_id.wrapping_add(1);
        id
    }

    /// The highest overlay MTU we ever probe or accept: the configured one, if it fits.
    fn mtu_cap(&self) -> u16 {
        let cap = codec::mtu_for_datagram_len(MAX_UDP_PAYLOAD, self.is_encrypted());
        self.cfg.max_mtu.min(cap)
    }

    fn start_frag_test(&mut self, now: Instant) {
        self.stack_frag = false;
        let id = self.probe_id();
        self.frag_outstanding = Some(id);
        self.control.push_back((Control::FragTest { id }, false));
        self.next_frag_test = Some(now + self.cfg.frag_test_interval);
    }

    fn start_pmtu(&mut self, now: Instant) {
        self.pmtu = Pmtu::Probing {
            candidate: self.pmtu_hi,
            sent: 0,
            deadline: now,
            interval: self.cfg.pmtu_probe_timeout,
        };
        self.pmtu_tick(now);
    }

    /// Move on from an answered or given-up candidate.
    fn pmtu_next_candidate(&mut self, now: Instant) {
        if self.pmtu_lo >= self.pmtu_hi {
            self.pmtu_hi = self.pmtu_lo;
            self.pmtu = Pmtu::Verified;
            self.events
                .push_back(ForwarderEvent::PmtuVerified(self.pmtu_lo));
            return;
        }
        // Upper middle, so every step makes progress.
        let candidate = self.pmtu_lo + (self.pmtu_hi - self.pmtu_lo).div_ceil(2);
        self.pmtu = Pmtu::Probing {
            candidate,
            sent: 0,
            deadline: now,
            interval: self.cfg.pmtu_probe_timeout,
        };
        self.pmtu_tick(now);
    }

    fn pmtu_tick(&mut self, now: Instant) {
        let Pmtu::Probing {
            candidate,
            sent,
            deadline,
            interval,
        } = self.pmtu
        else {
            return;
        };
        if now < deadline {
            return;
        }
        if sent >= self.cfg.pmtu_max_probes {
            // Candidate too big.
            self.pmtu_hi = candidate.saturating_sub(1).max(self.pmtu_lo);
            self.pmtu_next_candidate(now);
            return;
        }
        let id = self.probe_id();
        if self.pmtu_outstanding.len() >= MAX_PROBES {
            self.pmtu_outstanding.pop_front();
        }
        self.pmtu_outstanding.push_back((id, candidate));
        self.control
            .push_back((Control::PmtuProbe { id, mtu: candidate }, true));
        let wait = if sent == 0 { interval } else { interval * 2 };
        self.pmtu = Pmtu::Probing {
            candidate,
            sent: sent + 1,
            deadline: now + wait,
            interval: wait,
        };
    }

    fn pmtu_acked(&mut self, now: Instant, mtu: u16) {
        if mtu <= self.pmtu_lo {
            return;
        }
        // An ack proves `mtu` works, whatever we were probing.
        self.pmtu_lo = mtu;
        self.pmtu_hi = self.pmtu_hi.max(mtu);
        match self.pmtu {
            Pmtu::Probing { candidate, .. } if mtu >= candidate => self.pmtu_next_candidate(now),
            Pmtu::Probing { .. } => {}
            Pmtu::Idle | Pmtu::Verified => {
                self.pmtu = Pmtu::Verified;
                self.events
                    .push_back(ForwarderEvent::PmtuVerified(self.pmtu_lo));
            }
        }
    }
}
