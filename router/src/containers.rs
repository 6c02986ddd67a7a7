//! Which processes the router may give a weave interface: only the init process of a running
//! container that dockerd knows. The request names the container and its PID; the router asks
//! dockerd itself and refuses when they disagree, so nobody can plumb the overlay into a network
//! namespace they made themselves (`unshare -Urn`) by naming its PID.
//!
//! Pure: [`check_process`]. Shell: [`ContainerDirectory`] and its dockerd implementation
//! [`Dockerd`].

use std::future::Future;
use std::pin::Pin;

use std::collections::HashMap;

use bollard::query_parameters::{
    EventsOptionsBuilder, InspectContainerOptions, ListContainersOptions,
};
use bollard::Docker;
use futures::stream::BoxStream;
use futures::StreamExt;

/// What dockerd says about a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerProcess {
    /// The full container id.
    pub id: String,
    pub running: bool,
    /// The init process (0 when not running).
    pub pid: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContainerError {
    #[error("no such container {0:?}: weave attaches only containers that dockerd knows")]
    Unknown(String),
    #[error("container {0} is not running")]
    NotRunning(String),
    #[error("pid {pid} is not the process of container {id} (dockerd says {actual})")]
    WrongPid { id: String, pid: i32, actual: i32 },
    #[error("cannot ask dockerd about container {id}: {message}")]
    Unavailable { id: String, message: String },
}

type Lookup<'a> =
    Pin<Box<dyn Future<Output = Result<Option<ContainerProcess>, ContainerError>> + Send + 'a>>;
type Running<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<ContainerProcess>, ContainerError>> + Send + 'a>>;
/// Container events, by full id.
pub type Events = BoxStream<'static, Result<(String, ContainerEvent), ContainerError>>;

/// The container lifecycle events IPAM follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerEvent {
    Started,
    Died,
    Destroyed,
}

/// Where the router looks containers up (dockerd; a table in tests).
pub trait ContainerDirectory: Send + Sync + 'static {
    /// The container named `id` (an id, a prefix of one, or a name); `None` if there is none.
    fn lookup<'a>(&'a self, id: &'a str) -> Lookup<'a>;

    /// The running containers.
    fn running(&self) -> Running<'_> {
        Box::pin(async { Ok(Vec::new()) })
    }

    /// Start, die and destroy events from now on; ends on error.
    fn events(&self) -> Events {
        futures::stream::pending().boxed()
    }
}

/// Is `pid` the running process of the container `found` (looked up as `id`)?
pub fn check_process(
    id: &str,
    pid: i32,
    found: Option<ContainerProcess>,
) -> Result<ContainerProcess, ContainerError> {
    let c = found.ok_or_else(|| ContainerError::Unknown(id.to_string()))?;
    if !c.running || c.pid <= 0 {
        return Err(ContainerError::NotRunning(c.id));
    }
    if c.pid != pid {
        return Err(ContainerError::WrongPid {
            id: c.id,
            pid,
            actual: c.pid,
        });
    }
    Ok(c)
}

/// Look `id` up and check that `pid` is its process.
pub async fn verify(
    directory: &dyn ContainerDirectory,
    id: &str,
    pid: i32,
) -> Result<ContainerProcess, ContainerError> {
    check_process(id, pid, directory.lookup(id).await?)
}

/// dockerd, over its API.
pub struct Dockerd {
    docker: Docker,
}

impl Dockerd {
    /// `host`: `unix:///var/run/docker.sock`, a socket path, or `tcp://...`.
    pub fn connect(host: &str) -> Result<Self, ContainerError> {
        let host = if host.starts_with('/') {
            format!("unix://{host}")
        } else {
            host.to_string()
        };
        let docker = Docker::connect_with_host(&host).map_err(|e| ContainerError::Unavailable {
            id: String::new(),
            message: format!("cannot use Docker at {host}: {e}"),
        })?;
        Ok(Self { docker })
    }
}

impl ContainerDirectory for Dockerd {
    fn lookup<'a>(&'a self, id: &'a str) -> Lookup<'a> {
        Box::pin(async move {
            match self
                .docker
                .inspect_container(id, None::<InspectContainerOptions>)
                .await
            {
                Ok(c) => {
                    let state = c.state.unwrap_or_default();
                    Ok(Some(ContainerProcess {
                        id: c.id.unwrap_or_else(|| id.to_string()),
                        running: state.running.unwrap_or(false),
                        pid: state.pid.and_then(|p| i32::try_from(p).ok()).unwrap_or(0),
                    }))
                }
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => Ok(None),
                Err(e) => Err(ContainerError::Unavailable {
                    id: id.to_string(),
                    message: e.to_string(),
                }),
            }
        })
    }

    fn running(&self) -> Running<'_> {
        Box::pin(async move {
            let unavailable = |e: bollard::errors::Error| ContainerError::Unavailable {
                id: String::new(),
                message: e.to_string(),
            };
            let list = self
                .docker
                .list_containers(Some(ListContainersOptions::default()))
                .await
                .map_err(unavailable)?;
            let mut running = Vec::new();
            for id in list.into_iter().filter_map(|c| c.id) {
                // Gone in between: not running any more.
                if let Some(c) = self.lookup(&id).await?.filter(|c| c.running) {
                    running.push(c);
                }
            }
            Ok(running)
        })
    }

    fn events(&self) -> Events {
        let filters = HashMap::from([
            ("type", vec!["container"]),
            ("event", vec!["start", "die", "destroy"]),
        ]);
        let options = EventsOptionsBuilder::new().filters(&filters).build();
        self.docker
            .events(Some(options))
            .filter_map(|item| async move {
                match item {
                    Ok(message) => {
                        let event = match message.action.as_deref()? {
                            "start" => ContainerEvent::Started,
                            "die" => ContainerEvent::Died,
                            "destroy" => ContainerEvent::Destroyed,
                            _ => return None,
                        };
                        let id = message.actor.as_ref()?.id.clone()?;
                        Some(Ok((id, event)))
                    }
                    Err(e) => Some(Err(ContainerError::Unavailable {
                        id: String::new(),
                        message: format!("events: {e}"),
                    })),
                }
            })
            .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(pid: i32) -> Option<ContainerProcess> {
        Some(ContainerProcess {
            id: "abc123".into(),
            running: true,
            pid,
        })
    }

    #[test]
    fn only_the_containers_own_process() {
        assert_eq!(check_process("abc", 42, running(42)).map(|c| c.pid), Ok(42));
        assert_eq!(
            check_process("abc", 43, running(42)),
            Err(ContainerError::WrongPid {
                id: "abc123".into(),
                pid: 43,
                actual: 42
            })
        );
        assert_eq!(
            check_process("nope", 42, None),
            Err(ContainerError::Unknown("nope".into()))
        );
        let stopped = Some(ContainerProcess {
            id: "abc123".into(),
            running: false,
            pid: 0,
        });
        assert_eq!(
            check_process("abc", 0, stopped),
            Err(ContainerError::NotRunning("abc123".into()))
        );
    }
}
