//! Working inside a container's network namespace.
//!
//! A netlink socket (and any other socket) belongs to the network namespace of the thread that
//! created it, and `setns` switches only the calling thread. So every piece of work inside a
//! container runs on a fresh, dedicated OS thread that first joins the container's namespace and
//! then builds its own current-thread tokio runtime and netlink connection there. The thread
//! ends with the work; tokio's worker threads never change namespace.

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::MetadataExt;

use nix::sched::{setns, CloneFlags};
use rtnetlink::Handle;
use tokio::sync::oneshot;

use super::BridgeError;

/// Identity of a network namespace: device and inode of its nsfs file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NsId {
    dev: u64,
    ino: u64,
}

impl NsId {
    fn of(file: &File) -> io::Result<Self> {
        let meta = file.metadata()?;
        Ok(NsId {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// The network namespace of the calling thread.
pub(crate) fn current() -> Result<NsId, BridgeError> {
    let path = "/proc/thread-self/ns/net";
    File::open(path)
        .and_then(|f| NsId::of(&f))
        .map_err(|source| BridgeError::Io {
            op: "open network namespace",
            target: path.to_string(),
            source,
        })
}

/// Open the network namespace of process `pid` (keeping it alive while the file is open).
pub(crate) fn open_pid(pid: i32) -> Result<(File, NsId), BridgeError> {
    if pid <= 0 {
        return Err(BridgeError::InvalidPid(pid));
    }
    let path = format!("/proc/{pid}/ns/net");
    let file = File::open(&path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            BridgeError::NoSuchProcess { pid }
        } else {
            BridgeError::Io {
                op: "open network namespace",
                target: path.clone(),
                source,
            }
        }
    })?;
    let id = NsId::of(&file).map_err(|source| BridgeError::Io {
        op: "stat network namespace",
        target: path,
        source,
    })?;
    Ok((file, id))
}

/// Run `work` with a netlink handle bound to the namespace `ns` (of container `pid`, for
/// errors), on a dedicated thread, and hand back its result.
pub(crate) async fn run_in<F, Fut, T>(ns: File, pid: i32, work: F) -> Result<T, BridgeError>
where
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, BridgeError>>,
    T: Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name(format!("netns-{pid}"))
        .spawn(move || {
            let result = enter_and_run(ns, pid, work);
            // The receiver is gone only if the caller was cancelled; nothing to report then.
            let _ = tx.send(result);
        });
    if let Err(source) = spawned {
        return Err(BridgeError::Io {
            op: "spawn network namespace thread for pid",
            target: pid.to_string(),
            source,
        });
    }
    rx.await.map_err(|_| BridgeError::NetnsThread { pid })?
}

fn enter_and_run<F, Fut, T>(ns: File, pid: i32, work: F) -> Result<T, BridgeError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = Result<T, BridgeError>>,
{
    setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|errno| BridgeError::Io {
        op: "enter network namespace of pid",
        target: pid.to_string(),
        source: errno.into(),
    })?;
    drop(ns);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|source| BridgeError::Io {
            op: "start runtime in network namespace of pid",
            target: pid.to_string(),
            source,
        })?;
    runtime.block_on(async move {
        // Created after setns, so the socket lives in the container's namespace.
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|source| BridgeError::Io {
                op: "open netlink socket in network namespace of pid",
                target: pid.to_string(),
                source,
            })?;
        let driver = tokio::spawn(connection);
        let result = work(handle).await;
        driver.abort();
        result
    })
}
