//! Containers the proxy did not start itself (spec §5): at start-up, re-attach every running
//! container; afterwards, attach on each Docker `start` event (restart policies, `docker
//! start` made directly on dockerd, a router restart).
//!
//! One task owns the events subscription and the per-container jobs; each job is a task of its
//! own, cancelled when the container dies, is destroyed or starts again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};

use crate::attach::{attach_container, AttachError, AttachFailure, AttachOutcome};
use crate::docker::{unix_now, ContainerEvent, EventAction};
use crate::proxy::Proxy;
use crate::sys::PidFd;

/// Resubscription delays (spec §5.2).
const EVENTS_DELAY_FIRST: Duration = Duration::from_secs(1);
const EVENTS_DELAY_MAX: Duration = Duration::from_secs(20);
/// Re-attach retry delays (spec §5.1).
const REATTACH_DELAY_FIRST: Duration = Duration::from_secs(2);
const REATTACH_DELAY_MAX: Duration = Duration::from_secs(60);

/// `delay × 1.5`, at most `max`.
fn next_delay(delay: Duration, max: Duration) -> Duration {
    delay.mul_f64(1.5).min(max)
}

/// Runs until aborted.
pub(crate) async fn watch(proxy: Arc<Proxy>) {
    let mut jobs = Jobs::new(proxy.clone());
    let mut delay = EVENTS_DELAY_FIRST;
    // Docker replays the events since this time, so nothing is lost between the listing of
    // running containers (or a broken subscription) and the next subscription.
    let mut since = unix_now();
    let mut listed = false;
    loop {
        let subscribed_at = Instant::now();
        match proxy.docker.container_events(since).await {
            Ok(mut events) => {
                if !listed {
                    match proxy.docker.running_containers().await {
                        Ok(ids) => {
                            info!(count = ids.len(), "re-attaching running containers");
                            for id in ids {
                                jobs.reattach(id);
                            }
                            listed = true;
                        }
                        Err(e) => {
                            // Try again, subscription included, after the delay; `since`
                            // still covers the events of the meantime.
                            warn!(error = %e, "cannot list running containers");
                            tokio::time::sleep(delay).await;
                            delay = next_delay(delay, EVENTS_DELAY_MAX);
                            continue;
                        }
                    }
                }
                while let Some(event) = events.next().await {
                    match event {
                        Ok(event) => jobs.on_event(event),
                        Err(e) => {
                            warn!(error = %e, "Docker events subscription broke");
                            break;
                        }
                    }
                }
                since = unix_now().saturating_sub(1);
            }
            Err(e) => warn!(error = %e, "cannot subscribe to Docker events"),
        }
        if subscribed_at.elapsed() > delay {
            delay = EVENTS_DELAY_FIRST;
        }
        debug!(?delay, "resubscribing to Docker events");
        tokio::time::sleep(delay).await;
        delay = next_delay(delay, EVENTS_DELAY_MAX);
    }
}

/// The per-container attach jobs; dropping it cancels them all.
struct Jobs {
    proxy: Arc<Proxy>,
    tasks: JoinSet<()>,
    by_id: HashMap<String, AbortHandle>,
}

impl Jobs {
    fn new(proxy: Arc<Proxy>) -> Self {
        Self {
            proxy,
            tasks: JoinSet::new(),
            by_id: HashMap::new(),
        }
    }

    fn cancel(&mut self, id: &str) {
        if let Some(job) = self.by_id.remove(id) {
            job.abort();
        }
    }

    fn reap(&mut self) {
        while self.tasks.try_join_next().is_some() {}
        self.by_id.retain(|_, job| !job.is_finished());
    }

    fn on_event(&mut self, event: ContainerEvent) {
        self.reap();
        debug!(container = %event.id, action = ?event.action, "container event");
        self.cancel(&event.id);
        if event.action != EventAction::Start {
            return;
        }
        if self
            .proxy
            .starts
            .handled_by_proxy(&event.id, event.time_nano)
        {
            debug!(container = %event.id, "started through the proxy, which attaches it");
            return;
        }
        let proxy = self.proxy.clone();
        let id = event.id.clone();
        let span = tracing::info_span!("attach", container = %short(&id), via = "event");
        let job = self.tasks.spawn(
            async move {
                if let Err(failure) = attach_once(&proxy, &id).await {
                    // Nobody waits for this start: kill the process, not the container, so
                    // that a restart policy still applies (spec §3.4).
                    let pid = match failure.pid {
                        0 => current_pid(&proxy, &id).await,
                        pid => pid,
                    };
                    warn!(error = %failure, pid, "attach failed; killing the container's process");
                    kill_container_process(&proxy, &id, pid).await;
                }
            }
            .instrument(span),
        );
        self.by_id.insert(event.id, job);
    }

    /// Spec §5.1: attach now, and on failure again after 2 s, ×1.5, up to 60 s, until it works
    /// (a gone container counts as done).
    fn reattach(&mut self, id: String) {
        self.cancel(&id);
        let proxy = self.proxy.clone();
        let span = tracing::info_span!("attach", container = %short(&id), via = "startup");
        let job_id = id.clone();
        let job = self.tasks.spawn(
            async move {
                let mut delay = REATTACH_DELAY_FIRST;
                loop {
                    match attach_once(&proxy, &job_id).await {
                        Ok(_) => return,
                        Err(failure) => {
                            warn!(error = %failure, retry_in = ?delay, "re-attach failed");
                        }
                    }
                    tokio::time::sleep(delay).await;
                    delay = next_delay(delay, REATTACH_DELAY_MAX);
                }
            }
            .instrument(span),
        );
        self.by_id.insert(id, job);
    }
}

/// One bounded attach attempt.
async fn attach_once(proxy: &Proxy, id: &str) -> Result<AttachOutcome, AttachFailure> {
    let attach = attach_container(
        proxy.docker.as_ref(),
        proxy.network.as_ref(),
        id,
        &proxy.attach,
    );
    match tokio::time::timeout(proxy.attach_timeout, attach).await {
        Ok(result) => result,
        Err(_) => Err(AttachFailure {
            id: id.to_string(),
            pid: 0,
            error: AttachError::TimedOut(proxy.attach_timeout.as_secs()),
        }),
    }
}

/// The container's init PID now (0 if unknown).
async fn current_pid(proxy: &Proxy, id: &str) -> i32 {
    match proxy.docker.inspect_container(id).await {
        Ok(inspect) => inspect["State"]["Pid"]
            .as_i64()
            .and_then(|p| i32::try_from(p).ok())
            .unwrap_or(0),
        Err(_) => 0,
    }
}

/// SIGKILL to a container's init process, seen from the host PID namespace, and to no other
/// process that got its PID since: the process is pinned with a pidfd first, and signalled
/// through it only if dockerd still names that PID as the container's afterwards.
pub(crate) async fn kill_container_process(proxy: &Proxy, id: &str, pid: i32) {
    if pid <= 1 {
        return;
    }
    let pidfd = match PidFd::open(pid) {
        Ok(pidfd) => Some(pidfd),
        // Kernels before 5.3: the re-check below still narrows the window to almost nothing.
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => None,
        Err(e) => {
            warn!(pid, error = %e, "cannot kill the container's process: it is gone");
            return;
        }
    };
    let now = current_pid(proxy, id).await;
    if now != pid {
        warn!(pid, now, "the container's process changed; not killing it");
        return;
    }
    let sent = match pidfd {
        Some(pidfd) => pidfd.send_signal(libc::SIGKILL),
        None => nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .map_err(std::io::Error::from),
    };
    if let Err(e) = sent {
        warn!(pid, error = %e, "cannot kill process");
    }
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_by_half_up_to_the_cap() {
        let mut delay = REATTACH_DELAY_FIRST;
        let mut seen = vec![];
        for _ in 0..10 {
            seen.push(delay.as_millis());
            delay = next_delay(delay, REATTACH_DELAY_MAX);
        }
        assert_eq!(&seen[..4], &[2000, 3000, 4500, 6750]);
        assert_eq!(*seen.last().unwrap_or(&0), 60_000);
        assert_eq!(
            next_delay(EVENTS_DELAY_MAX, EVENTS_DELAY_MAX),
            EVENTS_DELAY_MAX
        );
    }
}
