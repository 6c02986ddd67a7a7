//! Between the mesh and the data plane (the sleeve).
//!
//! - [`feed_data_plane`] follows the mesh's [`DataPlaneView`] (a `watch`: latest wins) and turns
//!   each change into data-plane commands (peer up/down, rekey, routes): [`diff`] of what the
//!   data plane was last told against the latest view. The command queue is small and awaited:
//!   while the data plane is busy the feed waits, and meanwhile newer views simply replace older
//!   ones, so nothing piles up (a route table per topology change would, in a queue).
//! - [`watch_data_plane`] turns the data plane's status into [`OverlayStatus`] reports for the
//!   mesh (forwarder established / timed out, MTU), which gates each connection's `established`
//!   state on them, and into the report's `Interface` and `CaptureStats`. The router is ready
//!   once the data plane's capture is open (its first status).
//! - [`spawn_data_plane`] runs the data plane on a thread of its own.

use std::net::SocketAddr;

use tokio::sync::{mpsc, oneshot, watch};

use crate::mesh::conn::UdpKeys;
use crate::mesh_shell::{DataPlaneView, MeshHandle, OverlayPeer, OverlayStatus, PeerLink};
use crate::sleeve::SessionKeys;
use crate::sleeve_shell::{self, DataPlaneCommand, DataPlaneConfig, DataPlaneStatus};
use crate::status::{SleeveCounters, StatusSnapshot};
use crate::supervise::panic_message;

/// Commands on their way to the data plane (each small; routes are one table per change at
/// most, since the feed only sends the difference to the latest view).
pub const DATA_PLANE_QUEUE: usize = 64;

/// Why a feeding or watching task stopped (each is a supervised part: it must not).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeedError {
    #[error("the mesh stopped publishing")]
    MeshGone,
    #[error("the data plane stopped taking commands")]
    DataPlaneGone,
    #[error("the data plane stopped publishing its status")]
    StatusGone,
}

fn session_keys(k: &UdpKeys) -> SessionKeys {
    SessionKeys {
        epoch: k.epoch,
        send: k.send,
        recv: k.recv,
    }
}

/// The command that creates `name`'s forwarder. The dialling side knows the peer's UDP address
/// (its TCP address, mesh port); the listening side learns it from heartbeats, but in plaintext
/// mode, where the address is all that identifies the peer, it is given it too.
fn peer_up(name: crate::mesh::peer::PeerName, link: &PeerLink, port: u16) -> DataPlaneCommand {
    DataPlaneCommand::PeerUp {
        name,
        conn_uid: link.conn_uid,
        remote: (link.outbound || !link.udp_encrypted || link.keys.is_none())
            .then(|| SocketAddr::new(link.addr.ip(), port)),
        udp_keys: link
            .keys
            .as_ref()
            .filter(|_| link.udp_encrypted)
            .map(session_keys),
    }
}

/// What the data plane must be told to go from `sent` to `now`: gone peers down, new
/// connections up (a new connection to the same peer: down, then up), new keys, then the
/// routes (after the peers they may name).
pub fn diff(sent: &DataPlaneView, now: &DataPlaneView, port: u16) -> Vec<DataPlaneCommand> {
    let mut out = Vec::new();
    for name in sent.peers.keys() {
        if !now.peers.contains_key(name) {
            out.push(DataPlaneCommand::PeerDown { name: *name });
        }
    }
    for (name, link) in &now.peers {
        match sent.peers.get(name) {
            None => out.push(peer_up(*name, link, port)),
            Some(old) if old.conn_uid != link.conn_uid => {
                out.push(DataPlaneCommand::PeerDown { name: *name });
                out.push(peer_up(*name, link, port));
            }
            Some(old) => {
                if let Some(keys) = link.keys.as_ref().filter(|_| old.keys != link.keys) {
                    out.push(DataPlaneCommand::Rekey {
                        name: *name,
                        keys: session_keys(keys),
                    });
                }
            }
        }
    }
    if sent.routes != now.routes {
        out.push(DataPlaneCommand::Routes(now.routes.clone()));
    }
    out
}

/// Keep the data plane in step with the mesh's view until either side goes away.
pub async fn feed_data_plane(
    mut view: watch::Receiver<DataPlaneView>,
    data_plane: mpsc::Sender<DataPlaneCommand>,
    port: u16,
) -> Result<(), FeedError> {
    let mut sent = DataPlaneView::default();
    loop {
        let now = view.borrow_and_update().clone();
        for command in diff(&sent, &now, port) {
            data_plane
                .send(command)
                .await
                .map_err(|_| FeedError::DataPlaneGone)?;
        }
        sent = now;
        view.changed().await.map_err(|_| FeedError::MeshGone)?;
    }
}

/// What the mesh needs from the data plane's status: per peer, its forwarder's connection UID,
/// state and MTU.
pub fn overlay_status(dp: &DataPlaneStatus) -> OverlayStatus {
    OverlayStatus {
        peers: dp
            .peers
            .iter()
            .map(|(name, p)| {
                (
                    *name,
                    OverlayPeer {
                        conn_uid: p.conn_uid,
                        established: p.established,
                        mtu: p.mtu,
                        timed_out: p.timed_out,
                        udp_epoch: p.udp_epoch,
                        udp_key_switches: p.udp_key_switches,
                        udp_key_drops: p.udp_key_drops,
                    },
                )
            })
            .collect(),
    }
}

/// Follows the data plane's status (published on changes and about once a second): forwarder
/// states go to the mesh (when they changed), the capture interface and libpcap's counters to
/// the report. The data plane sends its first status once its capture is open: from then on
/// the router is ready (unless a part has failed). When it stops, the report goes back to no
/// interface, not ready, and this returns an error.
pub async fn watch_data_plane(
    mut dp: watch::Receiver<DataPlaneStatus>,
    mesh: MeshHandle,
    status: watch::Sender<StatusSnapshot>,
    interface: String,
) -> Result<(), FeedError> {
    let mut sent: Option<OverlayStatus> = None;
    while dp.changed().await.is_ok() {
        let (overlay, capture, sleeve) = {
            let now = dp.borrow_and_update();
            let sleeve = SleeveCounters {
                macs_evicted: now.drops.macs_evicted,
                icmp_rate_limited: now.drops.icmp_rate_limited,
            };
            (overlay_status(&now), now.capture, Some(sleeve))
        };
        status.send_if_modified(|s| {
            let ready = s.failed.is_none();
            let r = &mut s.router;
            let changed = r.interface != interface
                || r.capture_stats != Some(capture)
                || r.sleeve != sleeve
                || s.ready != ready;
            r.interface.clone_from(&interface);
            r.capture_stats = Some(capture);
            r.sleeve = sleeve;
            s.ready = ready;
            changed
        });
        if sent.as_ref() != Some(&overlay) {
            mesh.overlay_status(overlay.clone())
                .await
                .map_err(|_| FeedError::MeshGone)?;
            sent = Some(overlay);
        }
    }
    status.send_if_modified(|s| {
        let r = &mut s.router;
        let changed = !r.interface.is_empty() || r.capture_stats.is_some() || s.ready;
        r.interface.clear();
        r.capture_stats = None;
        r.sleeve = None;
        s.ready = false;
        changed
    });
    Err(FeedError::StatusGone)
}

/// Run the data plane on a thread of its own with a single-threaded runtime: every frame passes
/// through that one task, so it gets one thread for the capture thread to wake, no hops between
/// work-stealing workers, and no control-plane task (gossip, API) ahead of it in a queue.
/// The thread inherits the calling thread's network namespace. The returned receiver gets how
/// the data plane ended (`Ok` only after `stop`; an error, or its panic message, otherwise).
pub fn spawn_data_plane(
    config: DataPlaneConfig,
    commands: mpsc::Receiver<DataPlaneCommand>,
    status: watch::Sender<DataPlaneStatus>,
    stop: oneshot::Receiver<()>,
) -> std::io::Result<oneshot::Receiver<Result<(), String>>> {
    let (done_tx, done) = oneshot::channel();
    std::thread::Builder::new()
        .name("weave-sleeve".to_string())
        .spawn(move || {
            let run = || -> Result<(), String> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("cannot start its runtime: {e}"))?;
                let stopped = async {
                    let _ = stop.await;
                };
                runtime
                    .block_on(sleeve_shell::run_data_plane(
                        config, commands, status, stopped,
                    ))
                    .map_err(|e| e.to_string())
            };
            // The thread is a supervised part: a panic is reported like an error.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
                .unwrap_or_else(|p| Err(format!("panicked: {}", panic_message(&*p))));
            let _ = done_tx.send(result);
        })?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::peer::PeerName;
    use crate::mesh::routes::RouteTable;

    fn link(conn_uid: u64, outbound: bool, keys: Option<u32>) -> PeerLink {
        PeerLink {
            addr: "192.168.48.11:40000".parse().expect("addr"),
            outbound,
            conn_uid,
            udp_encrypted: keys.is_some(),
            keys: keys.map(|epoch| UdpKeys {
                epoch,
                send: [epoch as u8; 32],
                recv: [epoch as u8 + 1; 32],
            }),
        }
    }

    /// A short, comparable rendering of commands (they carry keys: no PartialEq).
    fn show(cmds: &[DataPlaneCommand]) -> Vec<String> {
        cmds.iter()
            .map(|c| match c {
                DataPlaneCommand::PeerUp {
                    name,
                    conn_uid,
                    remote,
                    udp_keys,
                } => format!(
                    "up {name} {conn_uid} {remote:?} {:?}",
                    udp_keys.as_ref().map(|k| k.epoch)
                ),
                DataPlaneCommand::PeerDown { name } => format!("down {name}"),
                DataPlaneCommand::Rekey { name, keys } => format!("rekey {name} {}", keys.epoch),
                DataPlaneCommand::Routes(_) => "routes".to_string(),
            })
            .collect()
    }

    #[test]
    fn diff_follows_the_view() {
        let (a, b) = (PeerName::from_u64(1), PeerName::from_u64(2));
        let empty = DataPlaneView::default();
        assert!(diff(&empty, &empty, 6783).is_empty());

        let mut v1 = DataPlaneView::default();
        v1.peers.insert(a, link(10, true, Some(0)));
        v1.peers.insert(b, link(20, false, None));
        assert_eq!(
            show(&diff(&empty, &v1, 6783)),
            vec![
                format!("up {a} 10 Some(192.168.48.11:6783) Some(0)"),
                // Plaintext: the listener is given the address too (the only check on it).
                format!("up {b} 20 Some(192.168.48.11:6783) None"),
            ]
        );

        // Rekey of a, routes changed, b reconnected, then a gone.
        let mut v2 = v1.clone();
        v2.peers.insert(a, link(10, true, Some(1)));
        v2.routes = RouteTable {
            unicast: [(b, b)].into_iter().collect(),
            ..RouteTable::default()
        };
        assert_eq!(
            show(&diff(&v1, &v2, 6783)),
            vec![format!("rekey {a} 1"), "routes".to_string()]
        );
        let mut v3 = v2.clone();
        v3.peers.insert(b, link(21, false, None));
        v3.peers.remove(&a);
        assert_eq!(
            show(&diff(&v2, &v3, 6783)),
            vec![
                format!("down {a}"),
                format!("down {b}"),
                format!("up {b} 21 Some(192.168.48.11:6783) None"),
            ]
        );
        assert!(diff(&v3, &v3, 6783).is_empty());
    }

    #[test]
    fn plaintext_links_get_no_keys() {
        let a = PeerName::from_u64(1);
        let mut v = DataPlaneView::default();
        let mut l = link(10, false, Some(0));
        l.udp_encrypted = false;
        v.peers.insert(a, l);
        assert_eq!(
            show(&diff(&DataPlaneView::default(), &v, 6783)),
            vec![format!("up {a} 10 Some(192.168.48.11:6783) None")]
        );
    }

    /// A data plane that cannot start reports why through its thread's result (a part failure),
    /// without taking the caller down.
    #[tokio::test]
    async fn data_plane_thread_reports_its_end() {
        let mut config =
            DataPlaneConfig::new(PeerName::from_u64(1), "127.0.0.1:0".parse().expect("addr"));
        config.capture_iface = "wvnosuchif0".to_string();
        let (_tx, rx) = mpsc::channel(1);
        let (status, _status_rx) = watch::channel(DataPlaneStatus::default());
        let (_stop, stop_rx) = oneshot::channel();
        let done = spawn_data_plane(config, rx, status, stop_rx).expect("thread");
        let ended = tokio::time::timeout(std::time::Duration::from_secs(10), done)
            .await
            .expect("it ends")
            .expect("it says how");
        let why = ended.expect_err("no capture interface: an error");
        assert!(why.contains("wvnosuchif0"), "{why}");
    }

    /// A data plane that takes commands slowly sees the latest view, not every step.
    #[tokio::test]
    async fn slow_data_plane_gets_the_latest() {
        let a = PeerName::from_u64(1);
        let (view_tx, view_rx) = watch::channel(DataPlaneView::default());
        let (tx, mut rx) = mpsc::channel(1);
        let feed = tokio::spawn(feed_data_plane(view_rx, tx, 6783));
        for epoch in 0..50 {
            view_tx.send_modify(|v| {
                v.peers.insert(a, link(10, false, Some(epoch)));
            });
        }
        let mut got = Vec::new();
        loop {
            let cmd = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
                .await
                .expect("a command")
                .expect("open");
            got.extend(show(&[cmd]));
            if got.last() == Some(&format!("rekey {a} 49"))
                || got.last() == Some(&format!("up {a} 10 None Some(49)"))
            {
                break;
            }
        }
        assert!(got.len() < 10, "intermediate views were skipped: {got:?}");
        drop(view_tx);
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), feed)
            .await
            .expect("feed ends")
            .expect("no panic");
        assert_eq!(ended, Err(FeedError::MeshGone));
    }
}
