//! The ConnectionMaker (spec §3.7): which addresses to dial and when. Pure: the shell resolves
//! host names, dials, reports outcomes, and calls [`ConnectionMaker::tick`] on every event and
//! at [`ConnectionMaker::poll_timeout`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand_core::RngCore;

use super::peer::PeerName;
use super::topology::Topology;

/// First retry interval.
pub const INITIAL_INTERVAL: Duration = Duration::from_secs(2);
/// Cap on the retry interval.
pub const MAX_INTERVAL: Duration = Duration::from_secs(6 * 60);
/// A connection that lived this long past its last try resets the backoff.
pub const RESET_AFTER: Duration = Duration::from_secs(60);

/// Jittered delay for `interval`: uniform in `[0.5·interval, 1.5·interval)`.
pub fn backoff_delay<R: RngCore>(interval: Duration, rng: &mut R) -> Duration {
    let half = interval / 2;
    let span = interval.as_nanos().min(u128::from(u64::MAX)) as u64;
    if span == 0 {
        return half;
    }
    half + Duration::from_nanos(rng.next_u64() % span)
}

/// The interval after one more failure: ×1.5, capped.
pub fn next_interval(interval: Duration) -> Duration {
    (interval + interval / 2).min(MAX_INTERVAL)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid peer name {0:?}, should be host[:port]")]
pub struct PeerSpecError(pub String);

/// Split a user peer string `host[:port]` (IPv6 as `[addr]:port`). Port 0 → `default_port`.
pub fn parse_peer_spec(s: &str, default_port: u16) -> Result<(String, u16, bool), PeerSpecError> {
    let err = || PeerSpecError(s.to_string());
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, tail) = rest.split_once(']').ok_or_else(err)?;
        match tail {
            "" => (h, None),
            t => (h, Some(t.strip_prefix(':').ok_or_else(err)?)),
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p)),
            Some(_) => (s, None),
            None => (s, None),
        }
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(err());
    }
    let (port, given) = match port {
        None => (default_port, false),
        Some(p) => match p.parse::<u16>().map_err(|_| err())? {
            0 => (default_port, true),
            n => (n, true),
        },
    };
    Ok((host.to_string(), port, given))
}

/// A direct peer after the shell resolved it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectPeer {
    /// What the user typed (persisted, listed by `weave status targets`).
    pub spec: String,
    pub addr: SocketAddr,
    /// The user gave a port (else: skipped while that IP has an inbound connection to us).
    pub port_given: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetState {
    /// Waiting for `next_try`; `last_error` set after a failure ("retrying").
    Waiting,
    /// Dial/handshake in progress ("connecting").
    Attempting,
    /// Connected; not yet established ("pending") or established.
    Connected { established: bool },
    /// Still a direct peer but not wanted now (e.g. connected at another address).
    Suspended,
    /// Never retried (connect to self, name collision), only set for an outcome the remote
    /// authenticated (password mode); the shell reports unauthenticated ones as ordinary
    /// failures, which back off, because anybody at the address could have claimed our name.
    Never,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    pub state: TargetState,
    pub last_error: Option<String>,
    pub next_try: Instant,
    pub interval: Duration,
    pub last_try: Option<Instant>,
    pub direct: bool,
    /// The peer at this address, once known.
    pub name: Option<PeerName>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnMakerConfig {
    /// Our mesh port (discovered peers that dialled someone are assumed to listen on it).
    pub port: u16,
    pub discovery: bool,
    /// 0 = unlimited.
    pub conn_limit: usize,
}

impl Default for ConnMakerConfig {
    fn default() -> Self {
        ConnMakerConfig {
            port: 6783,
            discovery: true,
            conn_limit: 200,
        }
    }
}

#[derive(Debug, Clone)]
struct LiveConn {
    addr: SocketAddr,
    outbound: bool,
}

#[derive(Debug)]
pub struct ConnectionMaker {
    config: ConnMakerConfig,
    me: PeerName,
    direct: Vec<DirectPeer>,
    targets: BTreeMap<SocketAddr, Target>,
    conns: BTreeMap<PeerName, LiveConn>,
}

impl ConnectionMaker {
    pub fn new(config: ConnMakerConfig, me: PeerName) -> Self {
        ConnectionMaker {
            config,
            me,
            direct: Vec::new(),
            targets: BTreeMap::new(),
            conns: BTreeMap::new(),
        }
    }

    /// `weave connect [--replace]` / launch peers. Existing targets for these addresses retry now.
    pub fn connect(&mut self, now: Instant, peers: Vec<DirectPeer>, replace: bool) {
        if replace {
            self.direct.clear();
        }
        for p in peers {
            if let Some(t) = self.targets.get_mut(&p.addr) {
                if matches!(t.state, TargetState::Waiting | TargetState::Suspended) {
                    t.state = TargetState::Waiting;
                    t.next_try = now;
                }
            }
            if !self
                .direct
                .iter()
                .any(|d| d.spec == p.spec && d.addr == p.addr)
            {
                self.direct.push(p);
            }
        }
    }

    /// `weave forget`: stop redialling these strings (existing connections stay).
    pub fn forget(&mut self, specs: &[String]) {
        self.direct.retain(|d| !specs.contains(&d.spec));
    }

    /// Direct-peer strings (`active_only` omits targets marked never, e.g. ourselves).
    pub fn direct_peers(&self, active_only: bool) -> Vec<String> {
        let mut out: Vec<String> = self
            .direct
            .iter()
            .filter(|d| {
                !active_only
                    || self
                        .targets
                        .get(&d.addr)
                        .is_none_or(|t| t.state != TargetState::Never)
            })
            .map(|d| d.spec.clone())
            .collect();
        out.dedup();
        out
    }

    /// Targets for `weave status targets/connections`.
    pub fn targets(&self) -> impl Iterator<Item = &Target> {
        self.targets.values()
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether another connection may be added (spec §2.5 limit).
    pub fn under_limit(&self) -> bool {
        self.config.conn_limit == 0 || self.conns.len() < self.config.conn_limit
    }

    /// A handshake completed (either direction) and the connection was added.
    pub fn on_connected(&mut self, name: PeerName, addr: SocketAddr, outbound: bool) {
        self.conns.insert(name, LiveConn { addr, outbound });
        if let Some(t) = self.targets.get_mut(&addr) {
            t.state = TargetState::Connected { established: false };
            t.last_error = None;
            t.name = Some(name);
        }
    }

    /// The overlay reported the connection established.
    pub fn on_established(&mut self, name: PeerName) {
        if let Some(c) = self.conns.get(&name) {
            if let Some(t) = self.targets.get_mut(&c.addr) {
                t.state = TargetState::Connected { established: true };
            }
        }
    }

    /// A dial or handshake to `addr` failed.
    pub fn on_attempt_failed<R: RngCore>(
        &mut self,
        now: Instant,
        addr: SocketAddr,
        error: String,
        permanent: bool,
        rng: &mut R,
    ) {
        if let Some(t) = self.targets.get_mut(&addr) {
            fail(t, now, error, permanent, rng);
        }
    }

    /// A connection ended.
    pub fn on_disconnected<R: RngCore>(
        &mut self,
        now: Instant,
        name: PeerName,
        error: Option<String>,
        permanent: bool,
        rng: &mut R,
    ) {
        let Some(c) = self.conns.remove(&name) else {
            return;
        };
        let Some(t) = self.targets.get_mut(&c.addr) else {
            return;
        };
        let lived = t
            .last_try
            .is_none_or(|last| now.saturating_duration_since(last) > RESET_AFTER);
        if !permanent && lived {
            t.state = TargetState::Waiting;
            t.interval = INITIAL_INTERVAL;
            t.next_try = now;
            t.last_error = error;
        } else {
            fail(t, now, error.unwrap_or_default(), permanent, rng);
        }
    }

    /// Recompute the wanted targets and return the addresses to dial now (marked attempting).
    pub fn tick(&mut self, now: Instant, topo: &Topology) -> Vec<SocketAddr> {
        let connected_addrs: BTreeSet<SocketAddr> = self.conns.values().map(|c| c.addr).collect();
        let inbound_ips: BTreeSet<IpAddr> = self
            .conns
            .values()
            .filter(|c| !c.outbound)
            .map(|c| c.addr.ip())
            .collect();
        let mut wanted: BTreeMap<SocketAddr, bool> = BTreeMap::new();
        for d in &self.direct {
            if connected_addrs.contains(&d.addr) {
                continue;
            }
            if !d.port_given && inbound_ips.contains(&d.addr.ip()) {
                continue;
            }
            wanted.insert(d.addr, true);
        }
        if self.config.discovery {
            for p in topo.peers() {
                if p.name == self.me {
                    continue;
                }
                for c in &p.conns {
                    if c.remote == self.me || self.conns.contains_key(&c.remote) {
                        continue;
                    }
                    let Ok(seen) = c.addr.parse::<SocketAddr>() else {
                        continue;
                    };
                    let addr = if c.outbound {
                        seen
                    } else {
                        SocketAddr::new(seen.ip(), self.config.port)
                    };
                    if !connected_addrs.contains(&addr) {
                        wanted.entry(addr).or_insert(false);
                    }
                }
            }
        }
        let direct_addrs: BTreeSet<SocketAddr> = self.direct.iter().map(|d| d.addr).collect();
        // Drop or suspend targets no longer wanted (connected ones stay for status).
        self.targets.retain(|addr, t| {
            if wanted.contains_key(addr)
                || matches!(
                    t.state,
                    TargetState::Attempting | TargetState::Connected { .. }
                )
            {
                return true;
            }
            if direct_addrs.contains(addr) {
                if t.state != TargetState::Never {
                    t.state = TargetState::Suspended;
                }
                return true;
            }
            false
        });
        for (addr, direct) in wanted {
            let t = self.targets.entry(addr).or_insert_with(|| Target {
                addr,
                state: TargetState::Waiting,
                last_error: None,
                next_try: now,
                interval: INITIAL_INTERVAL,
                last_try: None,
                direct,
                name: None,
            });
            t.direct = direct;
            if matches!(
                t.state,
                TargetState::Suspended | TargetState::Connected { .. }
            ) {
                t.state = TargetState::Waiting;
            }
        }
        let mut dial = Vec::new();
        let mut budget = if self.config.conn_limit == 0 {
            usize::MAX
        } else {
            let attempting = self
                .targets
                .values()
                .filter(|t| t.state == TargetState::Attempting)
                .count();
            self.config
                .conn_limit
                .saturating_sub(self.conns.len() + attempting)
        };
        for t in self.targets.values_mut() {
            if budget == 0 {
                break;
            }
            if t.state == TargetState::Waiting && t.next_try <= now {
                t.state = TargetState::Attempting;
                t.last_try = Some(now);
                dial.push(t.addr);
                budget -= 1;
            }
        }
        dial
    }

    /// When the earliest waiting target is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.targets
            .values()
            .filter(|t| t.state == TargetState::Waiting)
            .map(|t| t.next_try)
            .min()
    }
}

fn fail<R: RngCore>(t: &mut Target, now: Instant, error: String, permanent: bool, rng: &mut R) {
    t.last_error = Some(error);
    if permanent {
        t.state = TargetState::Never;
        return;
    }
    t.state = TargetState::Waiting;
    t.next_try = now + backoff_delay(t.interval, rng);
    t.interval = next_interval(t.interval);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::peer::PeerUid;
    use crate::mesh::topology::tests::peer;
    use crate::mesh::topology::{ConnSummary, PeerEntry};
    use proptest::prelude::*;
    use rand_core::OsRng;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn direct(spec: &str, a: &str, port_given: bool) -> DirectPeer {
        DirectPeer {
            spec: spec.into(),
            addr: addr(a),
            port_given,
        }
    }

    #[test]
    fn peer_spec() {
        assert_eq!(
            parse_peer_spec("h", 6783).unwrap(),
            ("h".into(), 6783, false)
        );
        assert_eq!(parse_peer_spec("h:1", 6783).unwrap(), ("h".into(), 1, true));
        assert_eq!(
            parse_peer_spec("h:0", 6783).unwrap(),
            ("h".into(), 6783, true)
        );
        assert_eq!(
            parse_peer_spec("[::1]:5", 6783).unwrap(),
            ("::1".into(), 5, true)
        );
        assert_eq!(
            parse_peer_spec("::1", 6783).unwrap(),
            ("::1".into(), 6783, false)
        );
        for bad in ["", ":5", "h:x", "h:70000", "[::1", "a b"] {
            assert!(parse_peer_spec(bad, 6783).is_err(), "{bad}");
        }
    }

    #[test]
    fn dial_fail_backoff_connect_forget() {
        let t0 = Instant::now();
        let topo = Topology::new(&peer(1));
        let mut cm = ConnectionMaker::new(ConnMakerConfig::default(), PeerName::from_u64(1));
        cm.connect(t0, vec![direct("10.0.0.2", "10.0.0.2:6783", false)], false);
        assert_eq!(cm.tick(t0, &topo), vec![addr("10.0.0.2:6783")]);
        assert!(cm.tick(t0, &topo).is_empty(), "attempting: not redialled");
        cm.on_attempt_failed(
            t0,
            addr("10.0.0.2:6783"),
            "refused".into(),
            false,
            &mut OsRng,
        );
        let t = cm.targets().next().unwrap().clone();
        assert_eq!(t.state, TargetState::Waiting);
        assert_eq!(t.last_error.as_deref(), Some("refused"));
        assert!(
            t.next_try >= t0 + Duration::from_secs(1) && t.next_try < t0 + Duration::from_secs(3)
        );
        assert_eq!(t.interval, Duration::from_secs(3));
        assert_eq!(cm.poll_timeout(), Some(t.next_try));
        assert!(cm.tick(t0, &topo).is_empty());
        assert_eq!(cm.tick(t.next_try, &topo).len(), 1);
        let n2 = PeerName::from_u64(2);
        cm.on_connected(n2, addr("10.0.0.2:6783"), true);
        cm.on_established(n2);
        assert_eq!(
            cm.targets().next().unwrap().state,
            TargetState::Connected { established: true }
        );
        // A long-lived connection ends: immediate retry with a reset interval.
        let later = t0 + Duration::from_secs(600);
        cm.on_disconnected(later, n2, Some("EOF".into()), false, &mut OsRng);
        let t = cm.targets().next().unwrap().clone();
        assert_eq!((t.next_try, t.interval), (later, INITIAL_INTERVAL));
        cm.forget(&["10.0.0.2".to_string()]);
        assert!(cm.direct_peers(false).is_empty());
        assert!(cm.tick(later, &topo).is_empty());
        assert_eq!(cm.targets().count(), 0);
    }

    #[test]
    fn self_is_never_retried() {
        let t0 = Instant::now();
        let topo = Topology::new(&peer(1));
        let mut cm = ConnectionMaker::new(ConnMakerConfig::default(), PeerName::from_u64(1));
        cm.connect(t0, vec![direct("me", "10.0.0.1:6783", true)], false);
        let a = cm.tick(t0, &topo);
        cm.on_attempt_failed(
            t0,
            a[0],
            "cannot connect to ourself".into(),
            true,
            &mut OsRng,
        );
        assert!(cm.tick(t0 + MAX_INTERVAL * 2, &topo).is_empty());
        assert_eq!(cm.direct_peers(false), vec!["me".to_string()]);
        assert!(cm.direct_peers(true).is_empty());
    }

    #[test]
    fn unauthenticated_self_only_backs_off() {
        let t0 = Instant::now();
        let topo = Topology::new(&peer(1));
        let mut cm = ConnectionMaker::new(ConnMakerConfig::default(), PeerName::from_u64(1));
        cm.connect(t0, vec![direct("maybe-me", "10.0.0.1:6783", true)], false);
        let a = cm.tick(t0, &topo);
        cm.on_attempt_failed(
            t0,
            a[0],
            "cannot connect to ourself".into(),
            false,
            &mut OsRng,
        );
        let t = cm.targets().next().unwrap();
        assert_eq!(t.state, TargetState::Waiting);
        assert!(t.next_try > t0);
        assert_eq!(cm.tick(t0 + MAX_INTERVAL * 2, &topo), a);
        assert_eq!(cm.direct_peers(true), vec!["maybe-me".to_string()]);
    }

    #[test]
    fn discovery_and_limits() {
        let t0 = Instant::now();
        let mut topo = Topology::new(&peer(1));
        // Peer 2 dialled 3 at 10.0.0.3:7000; 4 dialled 2 from 10.0.0.4:40000.
        topo.merge(vec![PeerEntry {
            name: PeerName::from_u64(2),
            nickname: String::new(),
            uid: PeerUid(9),
            version: 1,
            short_id: None,
            conns: vec![
                ConnSummary {
                    remote: PeerName::from_u64(3),
                    addr: "10.0.0.3:7000".into(),
                    outbound: true,
                    established: true,
                },
                ConnSummary {
                    remote: PeerName::from_u64(4),
                    addr: "10.0.0.4:40000".into(),
                    outbound: false,
                    established: true,
                },
                ConnSummary {
                    remote: PeerName::from_u64(1),
                    addr: "10.0.0.1:6783".into(),
                    outbound: false,
                    established: true,
                },
            ],
        }]);
        let mut cm = ConnectionMaker::new(ConnMakerConfig::default(), PeerName::from_u64(1));
        let mut got = cm.tick(t0, &topo);
        got.sort();
        assert_eq!(got, vec![addr("10.0.0.3:7000"), addr("10.0.0.4:6783")]);
        let mut nd = ConnectionMaker::new(
            ConnMakerConfig {
                discovery: false,
                ..ConnMakerConfig::default()
            },
            PeerName::from_u64(1),
        );
        assert!(nd.tick(t0, &topo).is_empty());
        let mut lim = ConnectionMaker::new(
            ConnMakerConfig {
                conn_limit: 1,
                ..ConnMakerConfig::default()
            },
            PeerName::from_u64(1),
        );
        assert_eq!(lim.tick(t0, &topo).len(), 1);
        assert!(lim.tick(t0, &topo).is_empty());
    }

    #[test]
    fn portless_direct_peer_skipped_while_inbound() {
        let t0 = Instant::now();
        let topo = Topology::new(&peer(1));
        let mut cm = ConnectionMaker::new(ConnMakerConfig::default(), PeerName::from_u64(1));
        cm.on_connected(PeerName::from_u64(2), addr("10.0.0.2:51000"), false);
        cm.connect(t0, vec![direct("10.0.0.2", "10.0.0.2:6783", false)], false);
        assert!(cm.tick(t0, &topo).is_empty());
        cm.connect(
            t0,
            vec![direct("10.0.0.2:6783", "10.0.0.2:6783", true)],
            false,
        );
        assert_eq!(cm.tick(t0, &topo).len(), 1);
    }

    proptest! {
        #[test]
        fn backoff_bounds(failures in 0usize..40, seed in any::<u64>()) {
            let _ = seed;
            let mut i = INITIAL_INTERVAL;
            for _ in 0..failures {
                let d = backoff_delay(i, &mut OsRng);
                prop_assert!(d >= i / 2);
                prop_assert!(d < i + i / 2);
                let n = next_interval(i);
                prop_assert!(n >= i && n <= MAX_INTERVAL);
                i = n;
            }
            prop_assert!(i <= MAX_INTERVAL);
            if failures >= 14 { prop_assert_eq!(i, MAX_INTERVAL); }
        }

        #[test]
        fn spec_parse_never_panics(s in ".{0,30}") {
            let _ = parse_peer_spec(&s, 6783);
        }
    }
}
