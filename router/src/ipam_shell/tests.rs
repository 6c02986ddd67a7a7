//! The actor around a fake core: replies reach the right caller, state is written before the
//! reply, callers that go away cancel their request, bad gossip drops the connection, a timeout
//! reaches the caller with its reason.

use std::collections::VecDeque;
use std::sync::Mutex;

use super::*;

fn cidr(s: &str) -> Ipv4Cidr {
    s.parse().expect("valid cidr")
}

#[derive(Default)]
struct Log(Mutex<Vec<String>>);

impl Log {
    fn push(&self, s: String) {
        if let Ok(mut v) = self.0.lock() {
            v.push(s);
        }
    }
    fn has(&self, s: &str) -> bool {
        self.0
            .lock()
            .map(|v| v.iter().any(|x| x == s))
            .unwrap_or(false)
    }
}

/// Hands out 10.32.0.1, .2, ... once "ready"; until then requests wait up to `timeout`.
struct FakeCore {
    ready: bool,
    next: u32,
    records: Vec<(String, Ipv4Cidr)>,
    waiting: Vec<(RequestId, String, Instant)>,
    timeout: Duration,
    out: VecDeque<CoreOutput>,
    log: Arc<Log>,
}

impl FakeCore {
    fn new(ready: bool, timeout: Duration, log: Arc<Log>) -> Self {
        FakeCore {
            ready,
            next: 1,
            records: Vec::new(),
            waiting: Vec::new(),
            timeout,
            out: VecDeque::new(),
            log,
        }
    }

    fn give(&mut self, id: RequestId, ident: &str) {
        let addr = Ipv4Cidr {
            addr: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 32, 0, 0)) + self.next),
            prefix_len: 12,
        };
        self.next += 1;
        self.records.push((ident.to_string(), addr));
        let state = serde_json::to_vec(
            &self
                .records
                .iter()
                .map(|(i, c)| (i.clone(), c.to_string()))
                .collect::<Vec<_>>(),
        )
        .unwrap_or_default();
        self.out.push_back(CoreOutput::Persist(state));
        self.out.push_back(CoreOutput::Reply {
            id,
            result: Ok(CoreReply::Addr(addr)),
        });
    }
}

impl Core for FakeCore {
    fn allocate(&mut self, now: Instant, id: RequestId, ident: &str, _: Option<Ipv4Cidr>) {
        self.out.push_back(CoreOutput::Send(AppSend::Broadcast {
            payload: b"hello".to_vec(),
        }));
        if self.ready {
            self.give(id, ident);
        } else {
            self.waiting
                .push((id, ident.to_string(), now + self.timeout));
        }
    }
    fn claim(&mut self, _: Instant, id: RequestId, ident: &str, cidr: Ipv4Cidr, _: bool) {
        self.records.push((ident.to_string(), cidr));
        self.out.push_back(CoreOutput::Reply {
            id,
            result: Ok(CoreReply::Done),
        });
    }
    fn prime(&mut self, _: Instant, id: RequestId) {
        self.out.push_back(CoreOutput::Reply {
            id,
            result: Ok(CoreReply::Done),
        });
    }
    fn cancel(&mut self, id: RequestId) {
        self.log.push(format!("cancel {id}"));
        if let Some(i) = self.waiting.iter().position(|w| w.0 == id) {
            self.waiting.remove(i);
            self.out.push_back(CoreOutput::Reply {
                id,
                result: Err(CoreError::Cancelled),
            });
        }
    }
    fn lookup(&self, ident: &str, _: Option<Ipv4Cidr>) -> Vec<Ipv4Cidr> {
        self.records
            .iter()
            .filter(|r| r.0 == ident)
            .map(|r| r.1)
            .collect()
    }
    fn free(&mut self, _: Instant, ident: &str, addr: Ipv4Addr) -> Result<(), String> {
        let before = self.records.len();
        self.records.retain(|r| !(r.0 == ident && r.1.addr == addr));
        if self.records.len() == before {
            return Err(format!("Free: address {addr} not found for {ident}"));
        }
        Ok(())
    }
    fn delete(&mut self, _: Instant, ident: &str) -> Result<(), String> {
        self.records.retain(|r| r.0 != ident);
        Ok(())
    }
    fn owned(&self) -> Vec<(String, Vec<Ipv4Cidr>)> {
        self.records
            .iter()
            .map(|r| (r.0.clone(), vec![r.1]))
            .collect()
    }
    fn container_event(&mut self, _: Instant, ident: &str, event: ContainerEvent) {
        self.log.push(format!("{event:?} {ident}"));
    }
    fn prune(&mut self, _: Instant, running: &BTreeSet<String>) {
        self.log.push(format!("prune {}", running.len()));
    }
    fn preclaim(&mut self, _: Instant, ident: &str, cidr: Ipv4Cidr) {
        self.log.push(format!("preclaim {ident} {cidr}"));
    }
    fn leave(&mut self, _: Instant) {
        self.log.push("leave".into());
    }
    fn rmpeer(&mut self, _: Instant, peer: &str) -> Result<u64, String> {
        Ok(peer.len() as u64)
    }
    fn on_event(&mut self, _: Instant, event: AppEvent) -> Result<(), String> {
        match event {
            AppEvent::Gossip { payload, .. } if payload == b"bad" => Err("bad ring".into()),
            AppEvent::Gossip { .. } => {
                self.ready = true;
                for (id, ident, _) in std::mem::take(&mut self.waiting) {
                    self.give(id, &ident);
                }
                Ok(())
            }
            AppEvent::Peers(_) => Ok(()),
        }
    }
    fn handle_timeout(&mut self, now: Instant) {
        let (due, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|w| w.2 <= now);
        self.waiting = rest;
        for (id, _, _) in due {
            self.out.push_back(CoreOutput::Reply {
                id,
                result: Err(CoreError::Failed(
                    "waiting for IPAM consensus: heard from 1 of the 2 peers needed".into(),
                )),
            });
        }
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.waiting.iter().map(|w| w.2).min()
    }
    fn poll_output(&mut self) -> Option<CoreOutput> {
        self.out.pop_front()
    }
    fn status(&self) -> Value {
        serde_json::json!({"ActiveIPs": self.records.len()})
    }
}

struct FakeTransport {
    log: Arc<Log>,
}

impl Transport for FakeTransport {
    fn send(&self, msg: AppSend) -> BoxFuture<'_, Result<(), String>> {
        self.log.push(format!("send {msg:?}"));
        Box::pin(async { Ok(()) })
    }
    fn reject(&self, from: PeerName, reason: String) -> BoxFuture<'_, ()> {
        self.log.push(format!("reject {from} {reason}"));
        Box::pin(async {})
    }
}

fn settings() -> IpamSettings {
    IpamSettings {
        range: cidr("10.32.0.0/12"),
        default_subnet: cidr("10.32.0.0/12"),
        init: InitSpec::Consensus { quorum: 1 },
        request_timeout: Duration::from_secs(5),
    }
}

fn scratch(name: &str) -> StateFile {
    let dir = std::env::temp_dir().join(format!("weave-ipam-actor-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    StateFile::new(dir.join("ipam.json"))
}

struct Running {
    handle: IpamHandle,
    events: mpsc::Sender<AppEvent>,
    log: Arc<Log>,
    state: StateFile,
    actor: tokio::task::JoinHandle<Result<(), String>>,
}

fn spawn(ready: bool, timeout: Duration, name: &str) -> Running {
    let log = Arc::new(Log::default());
    let (events_tx, events_rx) = mpsc::channel(8);
    let wire = Wire {
        events: futures::stream::unfold(events_rx, |mut rx| async move {
            rx.recv().await.map(|e| (e, rx))
        })
        .boxed(),
        transport: Arc::new(FakeTransport { log: log.clone() }),
    };
    let state = scratch(name);
    let core = Box::new(FakeCore::new(ready, timeout, log.clone()));
    let parts = start(core, settings(), wire, state.clone());
    let actor = tokio::spawn(parts.actor);
    tokio::spawn(parts.outgoing);
    Running {
        handle: parts.handle,
        events: events_tx,
        log,
        state,
        actor,
    }
}

async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never happened: {what}");
}

fn peer(s: &str) -> PeerName {
    s.parse().expect("peer name")
}

#[tokio::test]
async fn allocations_are_saved_before_they_are_answered() {
    let r = spawn(true, Duration::from_secs(5), "alloc");
    let a = r.handle.allocate("c1", None).await.expect("address");
    let b = r.handle.allocate("c2", None).await.expect("address");
    assert_eq!((a, b), (cidr("10.32.0.1/12"), cidr("10.32.0.2/12")));
    // The state on disk already has c2's address when its caller hears of it.
    let saved = String::from_utf8(r.state.load().expect("load").expect("saved")).expect("utf8");
    assert!(
        saved.contains("c2") && saved.contains("10.32.0.2/12"),
        "{saved}"
    );
    assert_eq!(
        r.handle.lookup("c1", None).await.expect("lookup"),
        vec![cidr("10.32.0.1/12")]
    );
    r.handle
        .claim("c3", cidr("10.32.9.9/12"), false)
        .await
        .expect("claim");
    r.handle
        .free("c3", Ipv4Addr::new(10, 32, 9, 9))
        .await
        .expect("free");
    assert_eq!(
        r.handle.free("c3", Ipv4Addr::new(10, 32, 9, 9)).await,
        Err(IpamCallError::Failed(
            "Free: address 10.32.9.9 not found for c3".into()
        ))
    );
    assert_eq!(r.handle.rmpeer("abc").await, Ok(3));
    // Gossip the core asked for reached the transport; the status followed the allocations.
    let log = r.log.clone();
    eventually("gossip sent", || {
        log.has("send Broadcast { payload: [104, 101, 108, 108, 111] }")
    })
    .await;
    assert_eq!(r.handle.status()["ActiveIPs"], 2);
    let _ = r.state.remove();
}

#[tokio::test]
async fn a_caller_that_goes_away_cancels_its_request() {
    let r = spawn(false, Duration::from_secs(60), "cancel");
    let waiting =
        tokio::time::timeout(Duration::from_millis(200), r.handle.allocate("c1", None)).await;
    assert!(waiting.is_err(), "no ring yet: the allocation waits");
    let log = r.log.clone();
    eventually("request 1 cancelled", || log.has("cancel 1")).await;
    // Once the ring arrives, later requests are served and the cancelled one is not.
    r.events
        .send(AppEvent::Gossip {
            kind: crate::mesh::app::GossipKind::Broadcast,
            src: peer("::2"),
            from: peer("::2"),
            payload: b"ring".to_vec(),
        })
        .await
        .expect("event");
    assert_eq!(
        r.handle.allocate("c2", None).await,
        Ok(cidr("10.32.0.1/12"))
    );
    let _ = r.state.remove();
}

#[tokio::test]
async fn a_timeout_reaches_the_caller_with_its_reason() {
    let r = spawn(false, Duration::from_millis(100), "timeout");
    let err = r.handle.allocate("c1", None).await.expect_err("times out");
    assert_eq!(
        err.to_string(),
        "waiting for IPAM consensus: heard from 1 of the 2 peers needed"
    );
    let _ = r.state.remove();
}

#[tokio::test]
async fn bad_gossip_drops_the_connection_it_came_on() {
    let r = spawn(true, Duration::from_secs(5), "reject");
    r.events
        .send(AppEvent::Gossip {
            kind: crate::mesh::app::GossipKind::Unicast,
            src: peer("::5"),
            from: peer("::7"),
            payload: b"bad".to_vec(),
        })
        .await
        .expect("event");
    let log = r.log.clone();
    eventually("connection rejected", || {
        log.has("reject 00:00:00:00:00:07 bad ring")
    })
    .await;
    // The mesh closing the channel ends the actor with an error (the router restarts).
    drop(r.events);
    let ended = tokio::time::timeout(Duration::from_secs(5), r.actor)
        .await
        .expect("actor ends")
        .expect("no panic");
    assert!(ended.is_err());
}

#[tokio::test]
async fn leave_cancels_whoever_waits() {
    let r = spawn(false, Duration::from_secs(60), "leave");
    let h = r.handle.clone();
    let waiter = tokio::spawn(async move { h.allocate("c1", None).await });
    let log = r.log.clone();
    // Let the request reach the actor before leaving.
    tokio::time::sleep(Duration::from_millis(50)).await;
    r.handle.leave().await.expect("leave");
    assert!(log.has("leave"));
    assert_eq!(
        waiter.await.expect("no panic"),
        Err(IpamCallError::Cancelled)
    );
    r.handle.container_event("c9", ContainerEvent::Died).await;
    eventually("died event reached the core", || log.has("Died c9")).await;
}

/// The real allocator behind the actor: a lone peer (quorum 1) allocates at once, saves its
/// state, and a new actor built from that state knows the container's address.
#[tokio::test]
async fn the_allocator_keeps_addresses_across_a_restart() {
    let state = scratch("real");
    let me = peer("aa:00:00:00:00:01");
    let make = |persisted: Option<Vec<u8>>| {
        let factory = builtin_core().expect("built in");
        factory(CoreInit {
            settings: settings(),
            me,
            nickname: "one".into(),
            uid: 7,
            persisted,
            now: now(),
        })
    };
    // As the mesh does when the channel opens: the peer list (just us) comes first.
    let peers = AppEvent::Peers(vec![crate::mesh::app::PeerInfo {
        name: me,
        nickname: "one".into(),
        reachable: true,
    }]);
    let run = |core: Box<dyn Core>| {
        let log = Arc::new(Log::default());
        let (events_tx, events_rx) = mpsc::channel::<AppEvent>(8);
        events_tx
            .try_send(peers.clone())
            .expect("room for the peer list");
        let wire = Wire {
            events: futures::stream::unfold(events_rx, |mut rx| async move {
                rx.recv().await.map(|e| (e, rx))
            })
            .boxed(),
            transport: Arc::new(FakeTransport { log }),
        };
        let parts = start(core, settings(), wire, state.clone());
        tokio::spawn(parts.actor);
        tokio::spawn(parts.outgoing);
        (parts.handle, events_tx)
    };
    let (first, _events) = run(make(None));
    let a = first.allocate("c1", None).await.expect("address");
    let b = first.allocate("c2", None).await.expect("address");
    assert_ne!(a, b);
    assert!(settings().range.contains(a.addr) && settings().range.contains(b.addr));
    assert_eq!(
        first.allocate("c1", None).await,
        Ok(a),
        "idempotent per container"
    );
    assert_eq!(first.status()["Status"], "ready");
    let saved = state.load().expect("load").expect("saved");
    let (second, _events2) = run(make(Some(saved)));
    assert_eq!(second.lookup("c1", None).await, Ok(vec![a]));
    let c = second.allocate("c3", None).await.expect("address");
    assert!(c != a && c != b, "{c} collides");
    let _ = state.remove();
}
