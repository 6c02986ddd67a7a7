//! The single owner of the bridge state (shell): one task holds the [`Bridge`] and applies
//! attach/detach/expose/hide commands one at a time, so they never interleave. Callers (the HTTP
//! API) talk to it through a cloneable [`ControlHandle`].

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::addr::Ipv4Cidr;
use crate::api_types::{AttachResponse, InterfaceInfo};
use crate::bridge::{Bridge, BridgeError};
use crate::iptables::{self, IptablesError};

/// Commands waiting beyond this many make callers wait (back-pressure, not a growing queue).
const QUEUE: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Bridge(#[from] BridgeError),
    #[error(transparent)]
    Iptables(#[from] IptablesError),
    #[error("the router is shutting down")]
    Stopped,
}

type Reply<T> = oneshot::Sender<Result<T, ControlError>>;

enum Command {
    Attach {
        pid: i32,
        addrs: Vec<Ipv4Cidr>,
        no_multicast_route: bool,
        keep_tx_on: bool,
        reply: Reply<AttachResponse>,
    },
    Detach {
        pid: i32,
        addrs: Vec<Ipv4Cidr>,
        reply: Reply<Vec<Ipv4Cidr>>,
    },
    Interface {
        pid: i32,
        reply: Reply<Option<InterfaceInfo>>,
    },
    BridgeInterface {
        reply: Reply<Option<InterfaceInfo>>,
    },
    Expose {
        cidr: Ipv4Cidr,
        skip_nat: bool,
        reply: Reply<()>,
    },
    Hide {
        cidr: Ipv4Cidr,
        reply: Reply<()>,
    },
}

#[derive(Debug, Clone)]
pub(crate) struct ControlHandle {
    tx: mpsc::Sender<Command>,
}

/// Start the owner task for `bridge`. It ends when every handle is dropped.
pub(crate) fn spawn(bridge: Bridge) -> (ControlHandle, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let task = tokio::spawn(run(bridge, rx));
    (ControlHandle { tx }, task)
}

impl ControlHandle {
    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, ControlError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| ControlError::Stopped)?;
        answer.await.map_err(|_| ControlError::Stopped)?
    }

    pub(crate) async fn attach(
        &self,
        pid: i32,
        addrs: Vec<Ipv4Cidr>,
        no_multicast_route: bool,
        keep_tx_on: bool,
    ) -> Result<AttachResponse, ControlError> {
        self.call(|reply| Command::Attach {
            pid,
            addrs,
            no_multicast_route,
            keep_tx_on,
            reply,
        })
        .await
    }

    pub(crate) async fn detach(
        &self,
        pid: i32,
        addrs: Vec<Ipv4Cidr>,
    ) -> Result<Vec<Ipv4Cidr>, ControlError> {
        self.call(|reply| Command::Detach { pid, addrs, reply })
            .await
    }

    pub(crate) async fn interface(&self, pid: i32) -> Result<Option<InterfaceInfo>, ControlError> {
        self.call(|reply| Command::Interface { pid, reply }).await
    }

    pub(crate) async fn bridge_interface(&self) -> Result<Option<InterfaceInfo>, ControlError> {
        self.call(|reply| Command::BridgeInterface { reply }).await
    }

    pub(crate) async fn expose(&self, cidr: Ipv4Cidr, skip_nat: bool) -> Result<(), ControlError> {
        self.call(|reply| Command::Expose {
            cidr,
            skip_nat,
            reply,
        })
        .await
    }

    pub(crate) async fn hide(&self, cidr: Ipv4Cidr) -> Result<(), ControlError> {
        self.call(|reply| Command::Hide { cidr, reply }).await
    }
}

async fn run(bridge: Bridge, mut rx: mpsc::Receiver<Command>) {
    while let Some(command) = rx.recv().await {
        // A caller that gave up (dropped its receiver) just doesn't get the answer.
        match command {
            Command::Attach {
                pid,
                addrs,
                no_multicast_route,
                keep_tx_on,
                reply,
            } => {
                let result = bridge
                    .attach(pid, &addrs, no_multicast_route, keep_tx_on)
                    .await
                    .map_err(ControlError::from);
                let _ = reply.send(result);
            }
            Command::Detach { pid, addrs, reply } => {
                let result = bridge.detach(pid, &addrs).await.map_err(ControlError::from);
                let _ = reply.send(result);
            }
            Command::Interface { pid, reply } => {
                let _ = reply.send(bridge.interface(pid).await.map_err(ControlError::from));
            }
            Command::BridgeInterface { reply } => {
                let _ = reply.send(bridge.bridge_interface().await.map_err(ControlError::from));
            }
            Command::Expose {
                cidr,
                skip_nat,
                reply,
            } => {
                let _ = reply.send(expose(&bridge, cidr, skip_nat).await);
            }
            Command::Hide { cidr, reply } => {
                let _ = reply.send(hide(&bridge, cidr).await);
            }
        }
    }
    tracing::debug!("bridge owner stopped");
}

async fn expose(bridge: &Bridge, cidr: Ipv4Cidr, skip_nat: bool) -> Result<(), ControlError> {
    bridge.expose(cidr).await?;
    iptables::expose_rules(bridge.name(), cidr, skip_nat).await?;
    Ok(())
}

async fn hide(bridge: &Bridge, cidr: Ipv4Cidr) -> Result<(), ControlError> {
    bridge.hide(cidr).await?;
    // Another exposed address in the same subnet still needs the subnet's rules.
    let still_exposed = match bridge.bridge_addrs().await {
        Ok(addrs) => addrs.iter().any(|a| a.network() == cidr.network()),
        Err(BridgeError::NoBridge { .. }) => false,
        Err(e) => return Err(e.into()),
    };
    if !still_exposed {
        iptables::hide_rules(cidr).await?;
    }
    Ok(())
}
