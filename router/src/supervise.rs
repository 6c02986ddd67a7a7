//! Supervision of the router's long-lived parts.
//!
//! Every part (the mesh listener, the mesh task with its connection maker and gossip, the
//! data-plane thread, the tasks feeding and watching it, the bridge owner) runs until the router
//! stops. If one ends early, returns an error or panics, the router would otherwise run on with
//! established links that are black holes. So each part is registered here; the first one that
//! ends is recorded (which part, and why) and [`Supervisor::failed`] resolves. The router then
//! reports not ready, logs it and exits non-zero, and Docker's `--restart always` starts a fresh
//! one.

use std::any::Any;
use std::fmt;
use std::future::Future;

use tokio::sync::{oneshot, watch};
use tokio::task::{AbortHandle, JoinHandle};

/// The first part that ended, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartFailure {
    /// e.g. `data plane`.
    pub part: &'static str,
    /// The error it returned, its panic message, or that it stopped on its own.
    pub why: String,
}

impl fmt::Display for PartFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ended: {}", self.part, self.why)
    }
}

/// What a part's task returns: `()` or `Result<(), E>`. Either way its ending is a failure
/// (parts run until the router stops them); this says why.
pub trait Outcome {
    fn why(self) -> String;
}

/// Said of a part that returned without an error: it must not return at all.
pub const STOPPED: &str = "stopped on its own";

impl Outcome for () {
    fn why(self) -> String {
        STOPPED.to_string()
    }
}

impl<E: fmt::Display> Outcome for Result<(), E> {
    fn why(self) -> String {
        match self {
            Ok(()) => STOPPED.to_string(),
            Err(e) => e.to_string(),
        }
    }
}

/// The message of a panic payload (`panic!` with a literal or a format string).
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

/// Resolves once a part has ended, whatever the reason (for a graceful wait at shutdown).
pub type PartDone = oneshot::Receiver<()>;

/// The registry of parts.
#[derive(Debug)]
pub struct Supervisor {
    failed: watch::Sender<Option<PartFailure>>,
    parts: Vec<(&'static str, AbortHandle)>,
}

impl Default for Supervisor {
    fn default() -> Self {
        Self::new()
    }
}

impl Supervisor {
    pub fn new() -> Self {
        Supervisor {
            failed: watch::channel(None).0,
            parts: Vec::new(),
        }
    }

    /// Run `part` as the task `name`.
    pub fn spawn<F>(&mut self, name: &'static str, part: F) -> PartDone
    where
        F: Future + Send + 'static,
        F::Output: Outcome + Send + 'static,
    {
        self.adopt(name, tokio::spawn(part))
    }

    /// Supervise the already running task `name`. A small watcher task awaits it and records
    /// how it ended; aborting it (at shutdown) is not a failure.
    pub fn adopt<T>(&mut self, name: &'static str, task: JoinHandle<T>) -> PartDone
    where
        T: Outcome + Send + 'static,
    {
        self.parts.push((name, task.abort_handle()));
        let failed = self.failed.clone();
        let (done_tx, done) = oneshot::channel();
        tokio::spawn(async move {
            let why = match task.await {
                Ok(outcome) => Some(outcome.why()),
                Err(e) if e.is_panic() => {
                    Some(format!("panicked: {}", panic_message(&*e.into_panic())))
                }
                Err(_) => None,
            };
            if let Some(why) = why {
                failed.send_if_modified(|f| {
                    let first = f.is_none();
                    if first {
                        *f = Some(PartFailure { part: name, why });
                    }
                    first
                });
            }
            let _ = done_tx.send(());
        });
        done
    }

    /// The names of the registered parts, in order.
    pub fn parts(&self) -> Vec<&'static str> {
        self.parts.iter().map(|(n, _)| *n).collect()
    }

    /// The first part that ended, once one has (never resolves otherwise).
    pub fn failed(&self) -> impl Future<Output = PartFailure> + Send + 'static {
        let mut rx = self.failed.subscribe();
        async move {
            loop {
                if let Some(f) = rx.borrow_and_update().clone() {
                    return f;
                }
                if rx.changed().await.is_err() {
                    // The supervisor is gone (router stopping): nothing more to report.
                    std::future::pending::<()>().await;
                }
            }
        }
    }

    /// Stop every part except those named in `keep` (they end on their own at shutdown).
    pub fn abort_except(&self, keep: &[&str]) {
        for (name, task) in &self.parts {
            if !keep.contains(name) {
                task.abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const WAIT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn first_error_wins() {
        let mut s = Supervisor::new();
        s.spawn("forever", std::future::pending::<()>());
        let (go_tx, go) = oneshot::channel::<()>();
        s.spawn("mesh", async move {
            let _ = go.await;
            Err::<(), _>("listener closed")
        });
        s.spawn("late", async {
            tokio::time::sleep(Duration::from_millis(200)).await;
        });
        let failed = s.failed();
        tokio::pin!(failed);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut failed)
                .await
                .is_err(),
            "nothing ended yet"
        );
        let _ = go_tx.send(());
        let f = tokio::time::timeout(WAIT, failed).await.unwrap();
        assert_eq!(
            f,
            PartFailure {
                part: "mesh",
                why: "listener closed".into()
            }
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            tokio::time::timeout(WAIT, s.failed()).await.unwrap().part,
            "mesh",
            "a later ending does not replace the first"
        );
        assert_eq!(s.parts(), vec!["forever", "mesh", "late"]);
    }

    #[tokio::test]
    async fn panic_and_plain_return_are_failures() {
        let mut s = Supervisor::new();
        s.spawn("capture", async {
            let n: u32 = "x".len() as u32;
            if n == 1 {
                panic!("pcap handle gone ({n})");
            }
        });
        let f = tokio::time::timeout(WAIT, s.failed()).await.unwrap();
        assert_eq!(f.part, "capture");
        assert_eq!(f.why, "panicked: pcap handle gone (1)");

        let mut s = Supervisor::new();
        s.spawn("gossip", async {});
        let f = tokio::time::timeout(WAIT, s.failed()).await.unwrap();
        assert_eq!(f.to_string(), format!("gossip ended: {STOPPED}"));
    }

    #[tokio::test]
    async fn aborting_is_not_a_failure() {
        let mut s = Supervisor::new();
        let done = s.spawn("api", std::future::pending::<()>());
        let kept = s.spawn("bridge", async {
            tokio::time::sleep(Duration::from_millis(100)).await;
        });
        s.abort_except(&["bridge"]);
        tokio::time::timeout(WAIT, done).await.unwrap().unwrap();
        // The kept part was not aborted: it ends on its own (and that is recorded).
        tokio::time::timeout(WAIT, kept).await.unwrap().unwrap();
        assert_eq!(
            tokio::time::timeout(WAIT, s.failed()).await.unwrap().part,
            "bridge"
        );
    }
}
