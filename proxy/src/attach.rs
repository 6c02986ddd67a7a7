//! The attach procedure (spec §3.3), shared by starts through the proxy, Docker events and the
//! start-up re-attach: inspect the container, decide, and ask the router to plumb `ethwe`.
//!
//! The decision ([`plan_attach`]) is pure; the router sits behind [`Network`] so tests use a
//! fake. Not done here yet: the `/etc/hosts` rewrite (§4.4, step 5) and weaveDNS registration
//! (step 7); they come with the DNS work.

use std::net::Ipv4Addr;

use futures::future::BoxFuture;
use futures::FutureExt;
use serde_json::Value;
use tracing::{debug, info, warn};
use weave_api::addr::AddrSpec;
use weave_api::client::{ClientError, RouterClient};
use weave_api::types::{AttachRequest, AttachResponse, InterfaceInfo};

use crate::cidr::{parse_weave_cidr, weave_cidr_from_env, CidrError, WeaveCidr};
use crate::docker::{DockerApi, DockerError};
use crate::rewrite::{decide, has_weavewait_entrypoint, Decision};

/// The router's side of attaching: plumbing and interface lookup.
pub trait Network: Send + Sync + 'static {
    /// Give the container whose init process is `req.pid` an `ethwe` with these addresses
    /// (idempotent).
    fn attach<'a>(
        &'a self,
        container_id: &'a str,
        req: &'a AttachRequest,
    ) -> BoxFuture<'a, Result<AttachResponse, ClientError>>;

    /// The weave interface in the netns of `pid`, if any.
    fn interfaces(&self, pid: i32) -> BoxFuture<'_, Result<Option<InterfaceInfo>, ClientError>>;
}

impl Network for RouterClient {
    fn attach<'a>(
        &'a self,
        container_id: &'a str,
        req: &'a AttachRequest,
    ) -> BoxFuture<'a, Result<AttachResponse, ClientError>> {
        RouterClient::attach(self, container_id, req).boxed()
    }

    fn interfaces(&self, pid: i32) -> BoxFuture<'_, Result<Option<InterfaceInfo>, ClientError>> {
        async move { RouterClient::interfaces(self, &pid.to_string()).await }.boxed()
    }
}

/// Settings of the attach that come from the proxy's flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttachOptions {
    pub no_multicast_route: bool,
    pub keep_tx_on: bool,
    pub no_default_ipalloc: bool,
}

/// What to do with a container, decided from its inspect JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachPlan {
    /// Nothing to do (the reason is for the log).
    Skip(String),
    Attach {
        id: String,
        pid: i32,
        addrs: Vec<AddrSpec>,
    },
}

/// Why an attach failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("{0}")]
    Cidr(#[from] CidrError),
    #[error("{0}")]
    Router(#[from] ClientError),
    #[error("container {0} has no usable PID")]
    NoPid(String),
    #[error("timed out after {0}s attaching the container to the weave network")]
    TimedOut(u64),
}

/// A failed attach, with the PID it was for (the events path kills that process, §3.4).
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct AttachFailure {
    pub id: String,
    pub pid: i32,
    #[source]
    pub error: AttachError,
}

/// Spec §3.3 steps 2–3 (pure): attach only a running container whose entrypoint is weavewait
/// and that §2.1 still says to weave, judged on the *inspected* NetworkMode and merged Env
/// (image ENV included).
pub fn plan_attach(inspect: &Value, opts: &AttachOptions) -> Result<AttachPlan, AttachFailure> {
    let id = inspect["Id"].as_str().unwrap_or_default().to_string();
    let pid = inspect["State"]["Pid"]
        .as_i64()
        .and_then(|p| i32::try_from(p).ok())
        .unwrap_or(0);
    let fail = |error| AttachFailure {
        id: id.clone(),
        pid,
        error,
    };
    if !has_weavewait_entrypoint(inspect) {
        return Ok(AttachPlan::Skip("its entrypoint is not weavewait".into()));
    }
    if inspect["State"]["Running"].as_bool() != Some(true) {
        return Ok(AttachPlan::Skip("it is not running".into()));
    }
    let env = inspect["Config"]["Env"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let network_mode = inspect["HostConfig"]["NetworkMode"].as_str();
    let weave_cidr = match decide(
        network_mode,
        weave_cidr_from_env(env),
        opts.no_default_ipalloc,
    ) {
        Decision::LeaveAlone(reason) => return Ok(AttachPlan::Skip(reason.to_string())),
        Decision::Weave { weave_cidr } => weave_cidr,
    };
    let addrs = match parse_weave_cidr(weave_cidr).map_err(|e| fail(e.into()))? {
        WeaveCidr::None => return Ok(AttachPlan::Skip("WEAVE_CIDR=none".into())),
        WeaveCidr::Addrs(addrs) => addrs,
    };
    if pid <= 1 {
        return Err(fail(AttachError::NoPid(id.clone())));
    }
    Ok(AttachPlan::Attach { id, pid, addrs })
}

/// What an attach did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachOutcome {
    Attached(AttachResponse),
    Skipped(String),
}

/// Spec §3.3: inspect, decide, attach. A container that is gone, or that cannot be inspected,
/// counts as done (logged).
pub async fn attach_container(
    docker: &dyn DockerApi,
    network: &dyn Network,
    id: &str,
    opts: &AttachOptions,
) -> Result<AttachOutcome, AttachFailure> {
    let inspect = match docker.inspect_container(id).await {
        Ok(inspect) => inspect,
        Err(DockerError::NoSuchContainer(_)) => {
            return Ok(AttachOutcome::Skipped("the container is gone".into()))
        }
        Err(e) => {
            warn!(container = id, error = %e, "cannot inspect container to attach it");
            return Ok(AttachOutcome::Skipped(format!("inspect failed: {e}")));
        }
    };
    match plan_attach(&inspect, opts)? {
        AttachPlan::Skip(reason) => {
            debug!(container = id, %reason, "not attaching");
            Ok(AttachOutcome::Skipped(reason))
        }
        AttachPlan::Attach { id, pid, addrs } => {
            let req = AttachRequest {
                pid,
                addrs,
                no_multicast_route: opts.no_multicast_route,
                keep_tx_on: opts.keep_tx_on,
            };
            match network.attach(&id, &req).await {
                Ok(reply) => {
                    info!(container = %id, pid, addrs = ?reply.addrs, "attached to weave network");
                    Ok(AttachOutcome::Attached(reply))
                }
                Err(e) => Err(AttachFailure {
                    id,
                    pid,
                    error: e.into(),
                }),
            }
        }
    }
}

/// The first address of an interface (`"10.32.0.1/12"`) as the inspect rewrite wants it.
pub fn first_addr(info: &InterfaceInfo) -> Option<(Ipv4Addr, u8)> {
    info.addrs.iter().find_map(|a| {
        let (ip, len) = a.split_once('/')?;
        Some((ip.parse().ok()?, len.parse().ok()?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn inspect(entrypoint: Value, running: bool, mode: &str, env: Value) -> Value {
        json!({
            "Id": "c0ffee",
            "State": {"Running": running, "Pid": 4242},
            "Config": {"Entrypoint": entrypoint, "Env": env, "Hostname": "h"},
            "HostConfig": {"NetworkMode": mode},
        })
    }

    fn plan(v: &Value) -> AttachPlan {
        plan_attach(v, &AttachOptions::default()).expect("plan")
    }

    #[test]
    fn attaches_weavewaited_running_bridge_containers() {
        let v = inspect(json!(["/w/w", "sh"]), true, "default", json!(["PATH=/bin"]));
        assert_eq!(
            plan(&v),
            AttachPlan::Attach {
                id: "c0ffee".into(),
                pid: 4242,
                addrs: vec![AddrSpec::DefaultSubnet]
            }
        );
        let v = inspect(
            json!(["/w/w"]),
            true,
            "bridge",
            json!(["WEAVE_CIDR=10.2.1.1/24 net:default"]),
        );
        let AttachPlan::Attach { addrs, .. } = plan(&v) else {
            panic!("should attach")
        };
        assert_eq!(addrs.len(), 2);
    }

    #[test]
    fn skips_the_rest() {
        let skip = |v: Value| matches!(plan(&v), AttachPlan::Skip(_));
        assert!(skip(inspect(json!(["sh"]), true, "default", json!([]))));
        assert!(skip(inspect(Value::Null, true, "default", json!([]))));
        assert!(skip(inspect(json!(["/w/w"]), false, "default", json!([]))));
        assert!(skip(inspect(json!(["/w/w"]), true, "host", json!([]))));
        assert!(skip(inspect(json!(["/w/w"]), true, "mynet", json!([]))));
        // The merged Env counts: an image `ENV WEAVE_CIDR=none` is left alone.
        assert!(skip(inspect(
            json!(["/w/w"]),
            true,
            "default",
            json!(["WEAVE_CIDR=none"])
        )));
        let opts = AttachOptions {
            no_default_ipalloc: true,
            ..Default::default()
        };
        let v = inspect(json!(["/w/w"]), true, "default", json!([]));
        assert!(matches!(plan_attach(&v, &opts), Ok(AttachPlan::Skip(_))));
    }

    #[test]
    fn bad_cidr_fails_with_the_pid() {
        let v = inspect(
            json!(["/w/w"]),
            true,
            "default",
            json!(["WEAVE_CIDR=10.1/8"]),
        );
        let err = plan_attach(&v, &AttachOptions::default()).expect_err("bad cidr");
        assert_eq!(err.pid, 4242);
        assert!(err.to_string().contains("10.1/8"), "{err}");
    }

    #[test]
    fn first_addr_parses() {
        let info = InterfaceInfo {
            mac: "aa".into(),
            addrs: vec!["junk".into(), "10.32.0.1/12".into()],
        };
        assert_eq!(first_addr(&info), Some((Ipv4Addr::new(10, 32, 0, 1), 12)));
    }
}
