//! The proxy's own calls to dockerd (shell): inspect container/image, kill, list, events.
//!
//! They go through bollard, which negotiates the API version with the daemon on first use
//! (`/version`), so dockerd 20.10 through 29 all work; the Go proxy pinned API 1.18, which
//! dockerd 25+ refuses (spec §1.4). Behind [`DockerApi`] so tests can fake dockerd.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use bollard::query_parameters::{EventsOptionsBuilder, ListContainersOptions};
use bollard::{Docker, API_DEFAULT_VERSION};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use serde_json::Value;
use tokio::sync::OnceCell;

use crate::rewrite::ImageConfig;
use crate::upstream::Upstream;

/// Seconds bollard waits for the head of a reply (not for a whole events stream).
const SIDE_CALL_TIMEOUT_SECS: u64 = 30;

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("No such container: {0}")]
    NoSuchContainer(String),
    /// Must be a 404 that names the image, so the docker CLI pulls and retries (spec §6).
    #[error("No such image: {0}")]
    NoSuchImage(String),
    #[error("Cannot connect to the Docker daemon at {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("{0}")]
    Api(#[from] bollard::errors::Error),
    #[error("unexpected reply from Docker: {0}")]
    BadReply(String),
}

impl DockerError {
    pub fn status(&self) -> u16 {
        match self {
            DockerError::NoSuchContainer(_) | DockerError::NoSuchImage(_) => 404,
            _ => 500,
        }
    }
}

/// What a container event means to the proxy (spec §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventAction {
    Start,
    Die,
    Destroy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerEvent {
    pub id: String,
    pub action: EventAction,
    /// Nanoseconds since the epoch, as Docker stamped it (0 when missing).
    pub time_nano: i64,
}

/// The calls the proxy makes to dockerd besides the requests it forwards.
pub trait DockerApi: Send + Sync + 'static {
    /// The container's inspect JSON (`Id`, `State`, `Config`, `HostConfig`, `Mounts`, ...).
    fn inspect_container<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Value, DockerError>>;
    /// The image's `Config.Entrypoint`/`Config.Cmd`.
    fn inspect_image<'a>(
        &'a self,
        image: &'a str,
    ) -> BoxFuture<'a, Result<ImageConfig, DockerError>>;
    /// `docker kill` (SIGKILL through Docker, which counts as a manual stop).
    fn kill_container<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), DockerError>>;
    /// IDs of the running containers.
    fn running_containers(&self) -> BoxFuture<'_, Result<Vec<String>, DockerError>>;
    /// One subscription to container start/die/destroy events since `since` (seconds since
    /// the epoch; Docker replays what it has buffered since then). The stream ends or errors
    /// when the subscription breaks.
    fn container_events(
        &self,
        since: i64,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Result<ContainerEvent, DockerError>>, DockerError>>;
}

/// [`DockerApi`] on bollard, connected lazily: the first call negotiates the API version, and
/// a failed connection is retried by the next call.
pub struct BollardDocker {
    upstream: Upstream,
    client: OnceCell<Docker>,
}

impl BollardDocker {
    pub fn new(upstream: Upstream) -> Self {
        Self {
            upstream,
            client: OnceCell::new(),
        }
    }

    async fn client(&self) -> Result<&Docker, DockerError> {
        self.client
            .get_or_try_init(|| async {
                let connect_error = |source| DockerError::Connect {
                    target: self.upstream.url(),
                    source,
                };
                let docker = match &self.upstream {
                    Upstream::Unix(path) => Docker::connect_with_unix(
                        &path.to_string_lossy(),
                        SIDE_CALL_TIMEOUT_SECS,
                        API_DEFAULT_VERSION,
                    ),
                    Upstream::Tcp(addr) => Docker::connect_with_http(
                        &format!("http://{addr}"),
                        SIDE_CALL_TIMEOUT_SECS,
                        API_DEFAULT_VERSION,
                    ),
                }
                .map_err(connect_error)?;
                let docker = docker.negotiate_version().await.map_err(connect_error)?;
                tracing::debug!(version = ?docker.client_version(), "negotiated Docker API version");
                Ok(docker)
            })
            .await
    }
}

fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

impl DockerApi for BollardDocker {
    fn inspect_container<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Value, DockerError>> {
        async move {
            let docker = self.client().await?;
            let inspect = docker.inspect_container(id, None).await.map_err(|e| {
                if is_not_found(&e) {
                    DockerError::NoSuchContainer(id.to_string())
                } else {
                    DockerError::Api(e)
                }
            })?;
            serde_json::to_value(inspect).map_err(|e| DockerError::BadReply(e.to_string()))
        }
        .boxed()
    }

    fn inspect_image<'a>(
        &'a self,
        image: &'a str,
    ) -> BoxFuture<'a, Result<ImageConfig, DockerError>> {
        async move {
            let docker = self.client().await?;
            let inspect = docker.inspect_image(image).await.map_err(|e| {
                if is_not_found(&e) {
                    DockerError::NoSuchImage(image.to_string())
                } else {
                    DockerError::Api(e)
                }
            })?;
            let config = inspect.config.unwrap_or_default();
            Ok(ImageConfig {
                entrypoint: config.entrypoint,
                cmd: config.cmd,
            })
        }
        .boxed()
    }

    fn kill_container<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), DockerError>> {
        async move {
            let docker = self.client().await?;
            docker.kill_container(id, None).await.map_err(|e| {
                if is_not_found(&e) {
                    DockerError::NoSuchContainer(id.to_string())
                } else {
                    DockerError::Api(e)
                }
            })
        }
        .boxed()
    }

    fn running_containers(&self) -> BoxFuture<'_, Result<Vec<String>, DockerError>> {
        async move {
            let docker = self.client().await?;
            let list = docker
                .list_containers(Some(ListContainersOptions::default()))
                .await?;
            Ok(list.into_iter().filter_map(|c| c.id).collect())
        }
        .boxed()
    }

    fn container_events(
        &self,
        since: i64,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Result<ContainerEvent, DockerError>>, DockerError>>
    {
        async move {
            let docker = self.client().await?;
            let filters = HashMap::from([
                ("type", vec!["container"]),
                ("event", vec!["start", "die", "destroy"]),
            ]);
            let options = EventsOptionsBuilder::new()
                .since(&since.to_string())
                .filters(&filters)
                .build();
            let stream = docker
                .events(Some(options))
                .filter_map(|item| async move {
                    match item {
                        Ok(message) => container_event(&message).map(Ok),
                        Err(e) => Some(Err(DockerError::Api(e))),
                    }
                })
                .boxed();
            Ok(stream)
        }
        .boxed()
    }
}

/// A container start/die/destroy event, or `None` for anything else (`exec_start: sh` must not
/// count as `start`).
fn container_event(message: &bollard::models::EventMessage) -> Option<ContainerEvent> {
    use bollard::models::EventMessageTypeEnum;
    if message.typ != Some(EventMessageTypeEnum::CONTAINER) {
        return None;
    }
    let action = match message.action.as_deref()? {
        "start" => EventAction::Start,
        "die" => EventAction::Die,
        "destroy" => EventAction::Destroy,
        _ => return None,
    };
    let id = message.actor.as_ref()?.id.clone()?;
    Some(ContainerEvent {
        id,
        action,
        time_nano: message
            .time_nano
            .or_else(|| message.time.map(|t| t.saturating_mul(1_000_000_000)))
            .unwrap_or(0),
    })
}

/// Seconds since the epoch, for `since=`.
pub(crate) fn unix_now() -> i64 {
    unix_now_nanos() / 1_000_000_000
}

/// Nanoseconds since the epoch, comparable with [`ContainerEvent::time_nano`].
pub(crate) fn unix_now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{EventActor, EventMessage, EventMessageTypeEnum};

    fn message(typ: EventMessageTypeEnum, action: &str) -> EventMessage {
        EventMessage {
            typ: Some(typ),
            action: Some(action.to_string()),
            actor: Some(EventActor {
                id: Some("c1".into()),
                attributes: None,
            }),
            time: Some(7),
            time_nano: None,
            ..Default::default()
        }
    }

    #[test]
    fn only_container_start_die_destroy() {
        let start = container_event(&message(EventMessageTypeEnum::CONTAINER, "start"));
        assert_eq!(
            start,
            Some(ContainerEvent {
                id: "c1".into(),
                action: EventAction::Start,
                time_nano: 7_000_000_000
            })
        );
        assert_eq!(
            container_event(&message(EventMessageTypeEnum::CONTAINER, "destroy")).map(|e| e.action),
            Some(EventAction::Destroy)
        );
        assert_eq!(
            container_event(&message(EventMessageTypeEnum::CONTAINER, "exec_start: sh")),
            None
        );
        assert_eq!(
            container_event(&message(EventMessageTypeEnum::NETWORK, "start")),
            None
        );
        assert_eq!(container_event(&EventMessage::default()), None);
    }

    #[test]
    fn not_found_maps_to_404() {
        assert_eq!(DockerError::NoSuchImage("x".into()).status(), 404);
        assert_eq!(
            DockerError::NoSuchImage("x".into()).to_string(),
            "No such image: x"
        );
        assert_eq!(DockerError::BadReply("x".into()).status(), 500);
    }
}
