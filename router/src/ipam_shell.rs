//! The IPAM actor (shell): one task owns the allocator (the pure core in `ipam/`, behind
//! [`Core`]) and feeds it everything it reacts to, one input at a time: requests from the HTTP
//! routes and attach, the mesh's `IPallocation` channel, Docker's container events, and its own
//! timers. What the core asks for comes back out of [`Core::poll_output`]: replies go to the
//! waiting caller, gossip to the mesh (through a bounded queue and its own task, so a slow mesh
//! never stalls requests), state to the [`StateFile`] (written before the reply that depends on
//! it is sent).
//!
//! A caller that goes away (HTTP client disconnected, attach timed out) has its request
//! cancelled within [`SWEEP`]: the actor looks for waiters whose receiver is gone. At start-up
//! the shell prunes records of containers that are no longer running and pre-claims the
//! addresses already on the bridge and on running containers' weave interfaces, so nothing in
//! use is handed out twice.

mod config;
mod persist;
mod view;

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};

pub use config::{
    overlapping_route, overlaps, parse_init, parse_proc_net_route, parse_subnet, quorum_for,
    request_timeout_from, settings, HostRoute, InitSpec, IpamConfigError, IpamSettings,
    DEFAULT_RANGE, REQUEST_TIMEOUT, REQUEST_TIMEOUT_ENV,
};
pub use persist::{StateFile, STATE_FILE};
pub use view::{render_peers, render_section, IpamView};

use crate::addr::Ipv4Cidr;
use crate::containers::{ContainerDirectory, ContainerEvent};
use crate::ipam;
use crate::mesh::app::{AppEvent, AppSend};
use crate::mesh::peer::PeerName;

/// The ident of the bridge's own addresses (`weave expose`).
pub const EXPOSE_IDENT: &str = "weave:expose";
/// How often waiters whose caller went away are looked for.
pub const SWEEP: Duration = Duration::from_secs(1);
/// Requests queued for the actor before callers wait.
const COMMAND_QUEUE: usize = 256;
/// Gossip waiting for the mesh; beyond it sends are dropped (the core re-sends on its timers).
const OUTGOING_QUEUE: usize = 256;

/// A request's id, as the core knows it.
pub type RequestId = u64;

/// What a request that waited got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoreReply {
    Addr(Ipv4Cidr),
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    /// The caller went away, or the container died, before the request was served.
    #[error("cancelled")]
    Cancelled,
    /// Why it failed, for the user (e.g. what consensus still waits for).
    #[error("{0}")]
    Failed(String),
}

/// What the core asks the shell to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoreOutput {
    Reply {
        id: RequestId,
        result: Result<CoreReply, CoreError>,
    },
    Send(AppSend),
    /// The whole state to keep across restarts.
    Persist(Vec<u8>),
}

/// The allocator as the shell drives it (sans-IO: every input takes `now`).
pub trait Core: Send + 'static {
    fn allocate(&mut self, now: Instant, id: RequestId, ident: &str, subnet: Option<Ipv4Cidr>);
    fn claim(
        &mut self,
        now: Instant,
        id: RequestId,
        ident: &str,
        cidr: Ipv4Cidr,
        no_error_on_unknown: bool,
    );
    fn prime(&mut self, now: Instant, id: RequestId);
    fn cancel(&mut self, id: RequestId);
    fn lookup(&self, ident: &str, subnet: Option<Ipv4Cidr>) -> Vec<Ipv4Cidr>;
    fn free(&mut self, now: Instant, ident: &str, addr: Ipv4Addr) -> Result<(), String>;
    fn delete(&mut self, now: Instant, ident: &str) -> Result<(), String>;
    fn owned(&self) -> Vec<(String, Vec<Ipv4Cidr>)>;
    fn container_event(&mut self, now: Instant, ident: &str, event: ContainerEvent);
    fn prune(&mut self, now: Instant, running: &BTreeSet<String>);
    fn preclaim(&mut self, now: Instant, ident: &str, cidr: Ipv4Cidr);
    fn leave(&mut self, now: Instant);
    fn rmpeer(&mut self, now: Instant, peer: &str) -> Result<u64, String>;
    /// An error means the payload was bad: the connection that delivered it is dropped.
    fn on_event(&mut self, now: Instant, event: AppEvent) -> Result<(), String>;
    fn handle_timeout(&mut self, now: Instant);
    fn poll_timeout(&self) -> Option<Instant>;
    fn poll_output(&mut self) -> Option<CoreOutput>;
    /// The report's `IPAM` object (spec §1.11).
    fn status(&self) -> Value;
}

/// What the core is built from.
pub struct CoreInit {
    pub settings: IpamSettings,
    pub me: PeerName,
    pub nickname: String,
    pub uid: u64,
    /// The state file's content, if any; the core decides whether it still applies.
    pub persisted: Option<Vec<u8>>,
    pub now: Instant,
}

pub type CoreFactory = Box<dyn FnOnce(CoreInit) -> Box<dyn Core> + Send>;

/// The mesh side of the `IPallocation` channel.
pub trait Transport: Send + Sync + 'static {
    fn send(&self, msg: AppSend) -> BoxFuture<'_, Result<(), String>>;
    /// Drop the connection to `from`, which delivered a bad payload.
    fn reject(&self, from: PeerName, reason: String) -> BoxFuture<'_, ()>;
}

/// The channel: events in, a transport out.
pub struct Wire {
    pub events: BoxStream<'static, AppEvent>,
    pub transport: Arc<dyn Transport>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamCallError {
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Failed(String),
    #[error("IP address allocation has stopped (the router is shutting down)")]
    Stopped,
}

type Waiter = oneshot::Sender<Result<CoreReply, CoreError>>;

enum Command {
    Allocate {
        ident: String,
        subnet: Option<Ipv4Cidr>,
        reply: Waiter,
    },
    Claim {
        ident: String,
        cidr: Ipv4Cidr,
        no_error_on_unknown: bool,
        reply: Waiter,
    },
    Prime {
        reply: Waiter,
    },
    Lookup {
        ident: String,
        subnet: Option<Ipv4Cidr>,
        reply: oneshot::Sender<Vec<Ipv4Cidr>>,
    },
    Free {
        ident: String,
        addr: Ipv4Addr,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Delete {
        ident: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Owned {
        reply: oneshot::Sender<Vec<(String, Vec<Ipv4Cidr>)>>,
    },
    Leave {
        reply: oneshot::Sender<()>,
    },
    Rmpeer {
        peer: String,
        reply: oneshot::Sender<Result<u64, String>>,
    },
    Container {
        ident: String,
        event: ContainerEvent,
    },
    Prune {
        running: BTreeSet<String>,
    },
    Preclaim {
        ident: String,
        cidr: Ipv4Cidr,
    },
}

/// The routes' and attach's way to the actor; cheap to clone.
#[derive(Clone)]
pub struct IpamHandle {
    tx: mpsc::Sender<Command>,
    settings: IpamSettings,
    status: watch::Receiver<Value>,
}

impl std::fmt::Debug for IpamHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpamHandle")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl IpamHandle {
    pub fn settings(&self) -> &IpamSettings {
        &self.settings
    }

    /// The latest `IPAM` report object.
    pub fn status(&self) -> Value {
        self.status.borrow().clone()
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, IpamCallError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| IpamCallError::Stopped)?;
        rx.await.map_err(|_| IpamCallError::Stopped)
    }

    async fn wait(&self, make: impl FnOnce(Waiter) -> Command) -> Result<CoreReply, IpamCallError> {
        match self.ask(make).await? {
            Ok(reply) => Ok(reply),
            Err(CoreError::Cancelled) => Err(IpamCallError::Cancelled),
            Err(CoreError::Failed(why)) => Err(IpamCallError::Failed(why)),
        }
    }

    /// An address for `ident` in `subnet` (`None`: the default subnet); waits for consensus or
    /// space, at most the core's request timeout. Dropping the future cancels the request.
    pub async fn allocate(
        &self,
        ident: &str,
        subnet: Option<Ipv4Cidr>,
    ) -> Result<Ipv4Cidr, IpamCallError> {
        let reply = self
            .wait(|reply| Command::Allocate {
                ident: ident.to_string(),
                subnet,
                reply,
            })
            .await?;
        match reply {
            CoreReply::Addr(cidr) => Ok(cidr),
            CoreReply::Done => Err(IpamCallError::Failed(
                "the allocator answered an allocation without an address".into(),
            )),
        }
    }

    /// Record `cidr` as `ident`'s (asking its owner for it when another peer owns it).
    pub async fn claim(
        &self,
        ident: &str,
        cidr: Ipv4Cidr,
        no_error_on_unknown: bool,
    ) -> Result<(), IpamCallError> {
        self.wait(|reply| Command::Claim {
            ident: ident.to_string(),
            cidr,
            no_error_on_unknown,
            reply,
        })
        .await
        .map(drop)
    }

    /// Wait until this peer has a ring (starting consensus if needed).
    pub async fn prime(&self) -> Result<(), IpamCallError> {
        self.wait(|reply| Command::Prime { reply }).await.map(drop)
    }

    pub async fn lookup(
        &self,
        ident: &str,
        subnet: Option<Ipv4Cidr>,
    ) -> Result<Vec<Ipv4Cidr>, IpamCallError> {
        self.ask(|reply| Command::Lookup {
            ident: ident.to_string(),
            subnet,
            reply,
        })
        .await
    }

    pub async fn free(&self, ident: &str, addr: Ipv4Addr) -> Result<(), IpamCallError> {
        self.ask(|reply| Command::Free {
            ident: ident.to_string(),
            addr,
            reply,
        })
        .await?
        .map_err(IpamCallError::Failed)
    }

    pub async fn delete(&self, ident: &str) -> Result<(), IpamCallError> {
        self.ask(|reply| Command::Delete {
            ident: ident.to_string(),
            reply,
        })
        .await?
        .map_err(IpamCallError::Failed)
    }

    pub async fn owned(&self) -> Result<Vec<(String, Vec<Ipv4Cidr>)>, IpamCallError> {
        self.ask(|reply| Command::Owned { reply }).await
    }

    /// `weave reset`: hand our ranges to another peer.
    pub async fn leave(&self) -> Result<(), IpamCallError> {
        self.ask(|reply| Command::Leave { reply }).await
    }

    /// `weave rmpeer`: take over `peer`'s ranges; how many addresses we gained.
    pub async fn rmpeer(&self, peer: &str) -> Result<u64, IpamCallError> {
        self.ask(|reply| Command::Rmpeer {
            peer: peer.to_string(),
            reply,
        })
        .await?
        .map_err(IpamCallError::Failed)
    }

    pub async fn container_event(&self, ident: &str, event: ContainerEvent) {
        let _ = self
            .tx
            .send(Command::Container {
                ident: ident.to_string(),
                event,
            })
            .await;
    }

    async fn prune(&self, running: BTreeSet<String>) {
        let _ = self.tx.send(Command::Prune { running }).await;
    }

    async fn preclaim(&self, ident: &str, cidr: Ipv4Cidr) {
        let _ = self
            .tx
            .send(Command::Preclaim {
                ident: ident.to_string(),
                cidr,
            })
            .await;
    }
}

/// Everything the actor owns.
pub struct IpamParts {
    pub handle: IpamHandle,
    /// The actor; ends when every handle is gone, fails when the mesh channel closes.
    pub actor: BoxFuture<'static, Result<(), String>>,
    /// Carries gossip to the mesh; ends with the actor.
    pub outgoing: BoxFuture<'static, Result<(), String>>,
}

enum Outgoing {
    Send(AppSend),
    Reject { from: PeerName, reason: String },
}

/// Build the actor around `core`; the caller spawns (and supervises) the two futures.
pub fn start(
    core: Box<dyn Core>,
    settings: IpamSettings,
    wire: Wire,
    state: StateFile,
) -> IpamParts {
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let (status_tx, status_rx) = watch::channel(core.status());
    let (out_tx, out_rx) = mpsc::channel(OUTGOING_QUEUE);
    let Wire { events, transport } = wire;
    IpamParts {
        handle: IpamHandle {
            tx,
            settings,
            status: status_rx,
        },
        actor: Box::pin(run_actor(core, rx, events, out_tx, state, status_tx)),
        outgoing: Box::pin(run_outgoing(out_rx, transport)),
    }
}

async fn run_outgoing(
    mut rx: mpsc::Receiver<Outgoing>,
    transport: Arc<dyn Transport>,
) -> Result<(), String> {
    while let Some(item) = rx.recv().await {
        match item {
            Outgoing::Send(msg) => {
                if let Err(e) = transport.send(msg).await {
                    tracing::debug!(error = %e, "IPAM gossip not sent");
                }
            }
            Outgoing::Reject { from, reason } => {
                tracing::warn!(peer = %from, %reason, "bad IPAM message: dropping the connection it came on");
                transport.reject(from, reason).await;
            }
        }
    }
    Ok(())
}

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

struct Actor {
    core: Box<dyn Core>,
    pending: HashMap<RequestId, Waiter>,
    next_id: RequestId,
    out: mpsc::Sender<Outgoing>,
    state: StateFile,
    status: watch::Sender<Value>,
}

impl Actor {
    fn id(&mut self) -> RequestId {
        self.next_id += 1;
        self.next_id
    }

    fn command(&mut self, cmd: Command) {
        let now = now();
        match cmd {
            Command::Allocate {
                ident,
                subnet,
                reply,
            } => {
                let id = self.id();
                self.pending.insert(id, reply);
                self.core.allocate(now, id, &ident, subnet);
            }
            Command::Claim {
                ident,
                cidr,
                no_error_on_unknown,
                reply,
            } => {
                let id = self.id();
                self.pending.insert(id, reply);
                self.core.claim(now, id, &ident, cidr, no_error_on_unknown);
            }
            Command::Prime { reply } => {
                let id = self.id();
                self.pending.insert(id, reply);
                self.core.prime(now, id);
            }
            Command::Lookup {
                ident,
                subnet,
                reply,
            } => {
                let _ = reply.send(self.core.lookup(&ident, subnet));
            }
            Command::Free { ident, addr, reply } => {
                let result = self.core.free(now, &ident, addr);
                self.publish();
                let _ = reply.send(result);
            }
            Command::Delete { ident, reply } => {
                let result = self.core.delete(now, &ident);
                self.publish();
                let _ = reply.send(result);
            }
            Command::Owned { reply } => {
                let _ = reply.send(self.core.owned());
            }
            Command::Leave { reply } => {
                // Whoever waits on this peer gets nothing more from it.
                for (id, waiter) in self.pending.drain() {
                    let _ = waiter.send(Err(CoreError::Cancelled));
                    self.core.cancel(id);
                }
                self.core.leave(now);
                self.publish();
                let _ = reply.send(());
            }
            Command::Rmpeer { peer, reply } => {
                let result = self.core.rmpeer(now, &peer);
                self.publish();
                let _ = reply.send(result);
            }
            Command::Container { ident, event } => {
                self.core.container_event(now, &ident, event);
            }
            Command::Prune { running } => self.core.prune(now, &running),
            Command::Preclaim { ident, cidr } => self.core.preclaim(now, &ident, cidr),
        }
    }

    fn event(&mut self, event: AppEvent) {
        let from = match &event {
            AppEvent::Gossip { from, .. } => Some(*from),
            AppEvent::Peers(_) => None,
        };
        if let Err(reason) = self.core.on_event(now(), event) {
            match from {
                Some(from) => self.outgoing(Outgoing::Reject { from, reason }),
                None => tracing::warn!(%reason, "IPAM refused a peer list"),
            }
        }
    }

    fn outgoing(&self, item: Outgoing) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.out.try_send(item) {
            tracing::debug!("IPAM gossip queue full: dropped a message (re-sent on the next tick)");
        }
    }

    /// Cancel the requests whose callers went away.
    fn sweep(&mut self) {
        let gone: Vec<RequestId> = self
            .pending
            .iter()
            .filter(|(_, w)| w.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.pending.remove(&id);
            tracing::debug!(id, "IPAM request's caller went away: cancelled");
            self.core.cancel(id);
        }
    }

    /// Everything the core asked for, in order (state saved before any reply goes out); the
    /// status it now reports is published before the replies, so a caller that got its answer
    /// reads a status that includes it.
    async fn drain(&mut self) {
        let mut replies = Vec::new();
        while let Some(output) = self.core.poll_output() {
            match output {
                CoreOutput::Reply { id, result } => {
                    if let Some(waiter) = self.pending.remove(&id) {
                        replies.push((waiter, result));
                    }
                }
                CoreOutput::Send(msg) => self.outgoing(Outgoing::Send(msg)),
                CoreOutput::Persist(bytes) => {
                    let state = self.state.clone();
                    let path = state.path().display().to_string();
                    match tokio::task::spawn_blocking(move || state.store(&bytes)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            tracing::error!(%path, error = %e, "cannot save IPAM state: addresses may not survive a restart")
                        }
                        Err(e) => tracing::error!(%path, error = %e, "saving IPAM state failed"),
                    }
                }
            }
        }
        self.publish();
        for (waiter, result) in replies {
            let _ = waiter.send(result);
        }
    }

    fn publish(&mut self) {
        let status = self.core.status();
        self.status.send_if_modified(|s| {
            if *s == status {
                false
            } else {
                *s = status;
                true
            }
        });
    }
}

async fn run_actor(
    core: Box<dyn Core>,
    mut commands: mpsc::Receiver<Command>,
    mut events: BoxStream<'static, AppEvent>,
    out: mpsc::Sender<Outgoing>,
    state: StateFile,
    status: watch::Sender<Value>,
) -> Result<(), String> {
    let mut actor = Actor {
        core,
        pending: HashMap::new(),
        next_id: 0,
        out,
        state,
        status,
    };
    let mut sweep = tokio::time::interval(SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        actor.drain().await;
        let deadline = actor.core.poll_timeout();
        let timer = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            cmd = commands.recv() => match cmd {
                Some(cmd) => actor.command(cmd),
                None => return Ok(()),
            },
            event = events.next() => match event {
                Some(event) => actor.event(event),
                None => return Err("the mesh closed the IPallocation channel".into()),
            },
            () = timer => actor.core.handle_timeout(now()),
            _ = sweep.tick() => actor.sweep(),
        }
    }
}

/// Start-up: forget records of containers no longer running, then claim what is in use on the
/// bridge and on running containers' weave interfaces. A Docker that cannot be asked prunes
/// nothing (better keep a dead container's address a while than hand out a live one's).
pub(crate) async fn startup_claims(
    ipam: &IpamHandle,
    containers: &dyn ContainerDirectory,
    control: &crate::control::ControlHandle,
) {
    match control.bridge_interface().await {
        Ok(Some(info)) => {
            for cidr in info.addrs.iter().filter_map(|a| a.parse::<Ipv4Cidr>().ok()) {
                ipam.preclaim(EXPOSE_IDENT, cidr).await;
            }
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the bridge's addresses to pre-claim them")
        }
    }
    let running = match containers.running().await {
        Ok(running) => running,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list running containers: IPAM keeps every record");
            return;
        }
    };
    ipam.prune(running.iter().map(|c| c.id.clone()).collect())
        .await;
    for c in running {
        match control.interface(c.pid).await {
            Ok(Some(info)) => {
                for cidr in info.addrs.iter().filter_map(|a| a.parse::<Ipv4Cidr>().ok()) {
                    tracing::debug!(container = %c.id, %cidr, "pre-claiming an address in use");
                    ipam.preclaim(&c.id, cidr).await;
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(container = %c.id, error = %e, "cannot read its weave interface")
            }
        }
    }
}

/// Docker's container events into the core, for as long as the router runs: reconnects after
/// an error (events missed meanwhile are caught up by the dead-container timers and the next
/// start-up's prune).
pub(crate) async fn pump_container_events(
    ipam: IpamHandle,
    containers: Arc<dyn ContainerDirectory>,
) -> Result<(), String> {
    let mut backoff = Duration::from_millis(500);
    loop {
        let mut events = containers.events();
        while let Some(item) = events.next().await {
            match item {
                Ok((id, event)) => {
                    backoff = Duration::from_millis(500);
                    ipam.container_event(&id, event).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Docker events ended");
                    break;
                }
            }
        }
        if ipam.tx.is_closed() {
            return Ok(());
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// The allocator this build drives: [`crate::ipam::Allocator`], with the OS's RNG.
pub fn builtin_core() -> Option<CoreFactory> {
    Some(Box::new(|init: CoreInit| -> Box<dyn Core> {
        let persisted = init.persisted.and_then(|bytes| {
            serde_json::from_slice::<ipam::Persisted>(&bytes)
                .map_err(|e| {
                    tracing::warn!(error = %e, "IPAM state file unreadable: starting afresh");
                })
                .ok()
        });
        let config = ipam::Config {
            universe: init.settings.range,
            default_subnet: init.settings.default_subnet,
            init: match init.settings.init {
                InitSpec::Consensus { quorum } => ipam::InitMode::Consensus { quorum },
                InitSpec::Seed(peers) => ipam::InitMode::Seed(peers),
                InitSpec::Observer => ipam::InitMode::Observer,
            },
            request_timeout: init.settings.request_timeout,
        };
        Box::new(ipam::Allocator::new(
            config,
            init.me,
            init.nickname,
            init.uid,
            persisted,
            Box::new(rand_core::OsRng),
            init.now,
        ))
    }))
}

fn core_error(e: ipam::IpamError) -> CoreError {
    match e {
        ipam::IpamError::Cancelled => CoreError::Cancelled,
        other => CoreError::Failed(other.to_string()),
    }
}

/// The pure allocator behind the shell's seam.
impl Core for ipam::Allocator {
    fn allocate(&mut self, now: Instant, id: RequestId, ident: &str, subnet: Option<Ipv4Cidr>) {
        ipam::Allocator::allocate(self, now, ipam::RequestId(id), ident, subnet);
    }
    fn claim(
        &mut self,
        now: Instant,
        id: RequestId,
        ident: &str,
        cidr: Ipv4Cidr,
        no_error_on_unknown: bool,
    ) {
        ipam::Allocator::claim(
            self,
            now,
            ipam::RequestId(id),
            ident,
            cidr,
            no_error_on_unknown,
        );
    }
    fn prime(&mut self, now: Instant, id: RequestId) {
        ipam::Allocator::prime(self, now, ipam::RequestId(id));
    }
    fn cancel(&mut self, id: RequestId) {
        ipam::Allocator::cancel(self, ipam::RequestId(id));
    }
    fn lookup(&self, ident: &str, subnet: Option<Ipv4Cidr>) -> Vec<Ipv4Cidr> {
        ipam::Allocator::lookup(self, ident, subnet)
    }
    fn free(&mut self, now: Instant, ident: &str, addr: Ipv4Addr) -> Result<(), String> {
        ipam::Allocator::free(self, now, ident, addr).map_err(|e| e.to_string())
    }
    fn delete(&mut self, now: Instant, ident: &str) -> Result<(), String> {
        ipam::Allocator::delete(self, now, ident).map_err(|e| e.to_string())
    }
    fn owned(&self) -> Vec<(String, Vec<Ipv4Cidr>)> {
        ipam::Allocator::owned(self)
    }
    fn container_event(&mut self, now: Instant, ident: &str, event: ContainerEvent) {
        match event {
            ContainerEvent::Started => self.container_started(now, ident),
            ContainerEvent::Died => self.container_died(now, ident),
            ContainerEvent::Destroyed => self.container_destroyed(now, ident),
        }
    }
    fn prune(&mut self, now: Instant, running: &BTreeSet<String>) {
        ipam::Allocator::prune(self, now, running);
    }
    fn preclaim(&mut self, now: Instant, ident: &str, cidr: Ipv4Cidr) {
        ipam::Allocator::preclaim(self, now, ident, cidr);
    }
    fn leave(&mut self, now: Instant) {
        ipam::Allocator::leave(self, now);
    }
    fn rmpeer(&mut self, now: Instant, peer: &str) -> Result<u64, String> {
        ipam::Allocator::rmpeer(self, now, peer).map_err(|e| e.to_string())
    }
    fn on_event(&mut self, now: Instant, event: AppEvent) -> Result<(), String> {
        ipam::Allocator::on_event(self, now, event).map_err(|e| e.to_string())
    }
    fn handle_timeout(&mut self, now: Instant) {
        ipam::Allocator::handle_timeout(self, now);
    }
    fn poll_timeout(&self) -> Option<Instant> {
        ipam::Allocator::poll_timeout(self)
    }
    fn poll_output(&mut self) -> Option<CoreOutput> {
        Some(match ipam::Allocator::poll_output(self)? {
            ipam::Output::Reply { id, result } => CoreOutput::Reply {
                id: id.0,
                result: result
                    .map(|reply| match reply {
                        ipam::Reply::Addr(cidr) => CoreReply::Addr(cidr),
                        ipam::Reply::Done => CoreReply::Done,
                    })
                    .map_err(core_error),
            },
            ipam::Output::Send(msg) => CoreOutput::Send(msg),
            ipam::Output::Persist(state) => match serde_json::to_vec(&state) {
                Ok(bytes) => CoreOutput::Persist(bytes),
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode IPAM state");
                    return self_poll_again(self);
                }
            },
        })
    }
    fn status(&self) -> Value {
        serde_json::to_value(ipam::Allocator::status(self)).unwrap_or(Value::Null)
    }
}

/// After an output the shell cannot carry out, the next one.
fn self_poll_again(core: &mut ipam::Allocator) -> Option<CoreOutput> {
    Core::poll_output(core)
}

/// The mesh's `IPallocation` channel as the actor's [`Wire`].
pub async fn mesh_wire(
    mesh: &crate::mesh_shell::MeshHandle,
) -> Result<Wire, crate::mesh_shell::MeshError> {
    let mut channel = mesh.open_channel(ipam::IPAM_CHANNEL).await?;
    // The events go to the actor; the rest of the channel carries what it sends.
    let (_, placeholder) = crate::queue::channel(1, 1);
    let events = std::mem::replace(&mut channel.events, placeholder);
    let events =
        futures::stream::unfold(
            events,
            |mut rx| async move { rx.recv().await.map(|e| (e, rx)) },
        )
        .boxed();
    Ok(Wire {
        events,
        transport: Arc::new(channel),
    })
}

impl Transport for crate::mesh_shell::AppChannel {
    fn send(&self, msg: AppSend) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            crate::mesh_shell::AppChannel::send(self, msg)
                .await
                .map_err(|e| e.to_string())
        })
    }
    fn reject(&self, from: PeerName, reason: String) -> BoxFuture<'_, ()> {
        Box::pin(crate::mesh_shell::AppChannel::reject(self, from, reason))
    }
}

#[cfg(test)]
mod tests;
