//! What every connection of the proxy shares (shell): how to reach dockerd, the side-call
//! client, the router, the rewrite settings, and which starts are in flight.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

use crate::attach::{AttachOptions, Network};
use crate::docker::{unix_now_nanos, DockerApi};
use crate::rewrite::CreateOptions;
use crate::upstream::Upstream;

/// How long a start through the proxy waits for its attach before it gives up, kills the
/// container and answers 500 (the Go proxy waited forever, spec §3.2).
pub(crate) const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) struct Proxy {
    pub(crate) upstream: Upstream,
    pub(crate) docker: Arc<dyn DockerApi>,
    pub(crate) network: Arc<dyn Network>,
    pub(crate) create: CreateOptions,
    pub(crate) attach: AttachOptions,
    pub(crate) rewrite_inspect: bool,
    pub(crate) starts: StartTracker,
    pub(crate) attach_timeout: Duration,
}

/// How long a finished start is remembered, to recognise its Docker `start` event.
const REMEMBER_FINISHED: Duration = Duration::from_secs(60);

/// Starts (and restarts) handled by the proxy, by full container ID. The events path leaves
/// the containers of these starts to the start handler, and an inspect rewrite waits for those
/// still in flight (spec §4.2).
#[derive(Default)]
pub(crate) struct StartTracker {
    state: Mutex<Starts>,
}

#[derive(Default)]
struct Starts {
    pending: HashMap<String, Pending>,
    /// Finished starts: when the first one began and the last one ended (ns since the epoch).
    finished: HashMap<String, (i64, i64)>,
}

struct Pending {
    count: usize,
    /// When the earliest of these starts began (ns since the epoch).
    began: i64,
    /// Never sent on: dropping it (when the last start ends) wakes the waiters.
    done: watch::Sender<()>,
}

/// Keeps a start registered while it lives.
pub(crate) struct StartGuard<'a> {
    tracker: &'a StartTracker,
    id: String,
}

impl StartTracker {
    fn lock(&self) -> MutexGuard<'_, Starts> {
        // The maps stay consistent even if a holder panicked: no update spans a panic point.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn begin(&self, id: &str) -> StartGuard<'_> {
        let now = unix_now_nanos();
        self.lock()
            .pending
            .entry(id.to_string())
            .or_insert_with(|| Pending {
                count: 0,
                began: now,
                done: watch::channel(()).0,
            })
            .count += 1;
        StartGuard {
            tracker: self,
            id: id.to_string(),
        }
    }

    #[cfg(test)]
    fn is_pending(&self, id: &str) -> bool {
        self.lock().pending.contains_key(id)
    }

    /// Whether a Docker `start` event stamped `time_nano` belongs to a start the proxy handles
    /// or handled (it attaches those itself). A later start (a restart policy, `docker start`
    /// on dockerd) is not.
    pub(crate) fn handled_by_proxy(&self, id: &str, time_nano: i64) -> bool {
        let starts = self.lock();
        if let Some(pending) = starts.pending.get(id) {
            return time_nano >= pending.began || time_nano == 0;
        }
        starts
            .finished
            .get(id)
            .is_some_and(|&(began, ended)| (began..=ended).contains(&time_nano))
    }

    /// Waits until no start of `id` is in flight, at most `limit`. True if it had to wait.
    pub(crate) async fn wait(&self, id: &str, limit: Duration) -> bool {
        let Some(mut done) = self.lock().pending.get(id).map(|p| p.done.subscribe()) else {
            return false;
        };
        // `changed` fails once the sender is gone, which is the signal.
        let _ = tokio::time::timeout(limit, done.changed()).await;
        true
    }
}

impl Drop for StartGuard<'_> {
    fn drop(&mut self) {
        let now = unix_now_nanos();
        let mut starts = self.tracker.lock();
        let Some(entry) = starts.pending.get_mut(&self.id) else {
            return;
        };
        entry.count = entry.count.saturating_sub(1);
        if entry.count > 0 {
            return;
        }
        let began = entry.began;
        starts.pending.remove(&self.id);
        let horizon = now.saturating_sub(i64::try_from(REMEMBER_FINISHED.as_nanos()).unwrap_or(0));
        starts
            .finished
            .retain(|_, &mut (_, ended)| ended >= horizon);
        starts.finished.insert(self.id.clone(), (began, now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_wake_when_the_last_start_ends() {
        let tracker = Arc::new(StartTracker::default());
        assert!(!tracker.wait("c1", Duration::from_secs(1)).await);
        let first = tracker.begin("c1");
        let second = tracker.begin("c1");
        assert!(tracker.is_pending("c1"));
        let waiter = {
            let tracker = tracker.clone();
            tokio::spawn(async move { tracker.wait("c1", Duration::from_secs(30)).await })
        };
        drop(first);
        assert!(tracker.is_pending("c1"));
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(second);
        assert!(!tracker.is_pending("c1"));
        assert!(waiter.await.expect("join"));
    }

    #[test]
    fn recognises_events_of_its_own_starts() {
        let tracker = StartTracker::default();
        let before = unix_now_nanos();
        let guard = tracker.begin("c1");
        let during = unix_now_nanos();
        assert!(tracker.handled_by_proxy("c1", during));
        assert!(!tracker.handled_by_proxy("c2", during));
        drop(guard);
        let after = unix_now_nanos() + 1;
        assert!(tracker.handled_by_proxy("c1", during));
        assert!(!tracker.handled_by_proxy("c1", before - 1));
        assert!(!tracker.handled_by_proxy("c1", after));
    }
}
