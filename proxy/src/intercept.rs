//! One proxied request (shell): pick the endpoint (spec §1.5), rewrite what needs rewriting,
//! forward to dockerd, and for starts attach before answering.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use serde_json::Value;
use tracing::{debug, info, warn, Instrument};
use weave_api::client::ClientError;

use crate::attach::{attach_container, first_addr, AttachError, AttachFailure};
use crate::body::{collect_reply, collect_request, full, set_content_length, stream, ProxyBody};
use crate::endpoint::{classify, Endpoint};
use crate::error::{error_response, ProxyError};
use crate::forward::{downstream, query_param};
use crate::hijack::{splice_upgraded, ClientSocket};
use crate::proxy::Proxy;
use crate::rewrite::{
    container_is_woven, exec_inspect_container, has_weavewait_entrypoint, parse_object,
    plan_create, rewrite_create, rewrite_exec, rewrite_exec_inspect, rewrite_inspect,
    rewrite_start_body, CreatePlan, RewriteError,
};

/// Serves one request that hyper parsed; never fails: errors become Docker-style replies.
pub(crate) async fn handle(proxy: Arc<Proxy>, req: Request<Incoming>) -> Response<ProxyBody> {
    let endpoint = classify(req.method(), req.uri().path());
    let span = tracing::debug_span!(
        "request",
        method = %req.method(),
        path = %req.uri().path(),
        endpoint = endpoint_name(&endpoint),
    );
    async move {
        let result = match endpoint {
            Endpoint::ContainerCreate => create(&proxy, req).await,
            Endpoint::ContainerStart { id } | Endpoint::ContainerRestart { id } => {
                start(&proxy, req, &id).await
            }
            Endpoint::ExecCreate { id } => exec_create(&proxy, req, &id).await,
            Endpoint::ContainerInspect { .. } if proxy.rewrite_inspect => {
                inspect(&proxy, req, Inspected::Container).await
            }
            Endpoint::ExecInspect { .. } if proxy.rewrite_inspect => {
                inspect(&proxy, req, Inspected::Exec).await
            }
            _ => pass_through(&proxy, req).await,
        };
        let response = result.unwrap_or_else(|e| {
            if e.status().is_server_error() {
                warn!(error = %e, "request failed");
            } else {
                debug!(error = %e, "request refused");
            }
            error_response(&e)
        });
        debug!(status = response.status().as_u16(), "proxied");
        response
    }
    .instrument(span)
    .await
}

fn endpoint_name(endpoint: &Endpoint) -> &'static str {
    match endpoint {
        Endpoint::ContainerCreate => "create",
        Endpoint::ContainerStart { .. } => "start",
        Endpoint::ContainerRestart { .. } => "restart",
        Endpoint::ContainerInspect { .. } => "inspect",
        Endpoint::ContainerAttach { .. } => "attach",
        Endpoint::ExecCreate { .. } => "exec-create",
        Endpoint::ExecStart { .. } => "exec-start",
        Endpoint::ExecInspect { .. } => "exec-inspect",
        Endpoint::Other => "other",
    }
}

/// Everything not intercepted: both bodies stream, and a 101 turns into a spliced tunnel.
async fn pass_through(
    proxy: &Proxy,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (mut parts, body) = req.into_parts();
    // Present only when the client asked to upgrade; hyper resolves it after our 101.
    let client_upgrade = parts.extensions.remove::<OnUpgrade>();
    let client_socket = parts.extensions.remove::<ClientSocket>();
    fix_host(&mut parts.headers);
    let mut response = proxy
        .upstream
        .send(Request::from_parts(parts, stream(body)))
        .await?;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let client_upgrade = client_upgrade.ok_or(ProxyError::UnexpectedUpgrade)?;
        splice_upgraded(
            client_upgrade,
            hyper::upgrade::on(&mut response),
            client_socket,
        );
        // Docker's status line and headers (Connection/Upgrade included) go back as they are.
        let (parts, _) = response.into_parts();
        return Ok(Response::from_parts(parts, full(Bytes::new())));
    }
    let (parts, body) = response.into_parts();
    Ok(downstream(Response::from_parts(parts, ()), stream(body)))
}

/// Sends a request whose body we hold whole (original or rewritten) with an exact length.
async fn send_bytes(
    proxy: &Proxy,
    mut parts: Parts,
    body: Bytes,
) -> Result<Response<Incoming>, ProxyError> {
    fix_host(&mut parts.headers);
    set_content_length(&mut parts.headers, body.len());
    parts.extensions.remove::<OnUpgrade>();
    Ok(proxy
        .upstream
        .send(Request::from_parts(parts, full(body)))
        .await?)
}

fn pass_reply(response: Response<Incoming>) -> Response<ProxyBody> {
    let (parts, body) = response.into_parts();
    downstream(Response::from_parts(parts, ()), stream(body))
}

/// Old clients sent the socket path as Host, which dockerd's Go server rejects (spec §1.7).
fn fix_host(headers: &mut HeaderMap) {
    if headers
        .get(HOST)
        .is_some_and(|host| host.as_bytes().starts_with(b"/"))
    {
        headers.insert(HOST, HeaderValue::from_static(""));
    }
}

/// `POST /containers/create` (spec §2).
async fn create(proxy: &Proxy, req: Request<Incoming>) -> Result<Response<ProxyBody>, ProxyError> {
    let (parts, body) = req.into_parts();
    let bytes = collect_request(body).await?;
    let value = parse_object(&bytes)?;
    let body = match plan_create(&value, &proxy.create)? {
        CreatePlan::LeaveAlone(reason) => {
            info!("Leaving container alone because {reason}");
            bytes
        }
        CreatePlan::Weave { image_to_inspect } => {
            let image = match image_to_inspect {
                Some(image) => Some(proxy.docker.inspect_image(&image).await?),
                None => None,
            };
            let name = query_param(parts.uri.query(), "name");
            let rewritten = rewrite_create(value, name.as_deref(), image.as_ref(), &proxy.create)?;
            to_json(&rewritten)?
        }
    };
    Ok(pass_reply(send_bytes(proxy, parts, body).await?))
}

fn to_json(value: &Value) -> Result<Bytes, ProxyError> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|e| ProxyError::Rewrite(RewriteError::InvalidJson(e)))
}

/// `POST /containers/{id}/start` and `/restart` (spec §3): rewrite a legacy body, forward, and
/// when Docker started the container, attach it before answering, so that `docker run` returns
/// once `ethwe` is up. A failed attach kills the container and fails the request.
async fn start(
    proxy: &Proxy,
    req: Request<Incoming>,
    id: &str,
) -> Result<Response<ProxyBody>, ProxyError> {
    let inspect = proxy.docker.inspect_container(id).await?;
    let full_id = inspect["Id"].as_str().unwrap_or(id).to_string();
    let weavewaited = has_weavewait_entrypoint(&inspect);
    let (parts, body) = req.into_parts();
    let body = if weavewaited && is_json(&parts.headers) && content_length(&parts.headers) > 0 {
        let bytes = collect_request(body).await?;
        let hostname = inspect["Config"]["Hostname"].as_str().unwrap_or_default();
        match rewrite_start_body(&bytes, &proxy.create, hostname)? {
            Some(rewritten) => {
                debug!(container = %full_id, "rewrote legacy HostConfig in start body");
                to_json(&rewritten)?
            }
            None => bytes,
        }
    } else if weavewaited {
        collect_request(body).await?
    } else {
        return pass_through(proxy, Request::from_parts(parts, body)).await;
    };

    let _pending = proxy.starts.begin(&full_id);
    let response = send_bytes(proxy, parts, body).await?;
    if !response.status().is_success() {
        // Errors, and 304 for a container that already runs: nothing to attach.
        return Ok(pass_reply(response));
    }
    let attach = attach_container(
        proxy.docker.as_ref(),
        proxy.network.as_ref(),
        &full_id,
        &proxy.attach,
    );
    let failure = match tokio::time::timeout(proxy.attach_timeout, attach).await {
        Ok(Ok(outcome)) => {
            debug!(container = %full_id, ?outcome, "start attach done");
            return Ok(pass_reply(response));
        }
        Ok(Err(failure)) => ProxyError::Attach(failure),
        Err(_) => ProxyError::Attach(AttachFailure {
            id: full_id.clone(),
            pid: 0,
            error: AttachError::TimedOut(proxy.attach_timeout.as_secs()),
        }),
    };
    warn!(container = %full_id, error = %failure, "attach failed; killing the container");
    if let Err(e) = proxy.docker.kill_container(&full_id).await {
        warn!(container = %full_id, error = %e, "cannot kill container after failed attach");
    }
    Err(failure)
}

/// Spec §3.5: only `Content-Type: application/json` exactly.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == b"application/json")
}

fn content_length(headers: &HeaderMap) -> u64 {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// `POST /containers/{id}/exec` (spec §4.1): an exec into a woven container waits for the
/// network like the main process.
async fn exec_create(
    proxy: &Proxy,
    req: Request<Incoming>,
    id: &str,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (parts, body) = req.into_parts();
    let bytes = collect_request(body).await?;
    let value = parse_object(&bytes)?;
    let inspect = proxy.docker.inspect_container(id).await?;
    let body = if container_is_woven(&inspect) {
        to_json(&rewrite_exec(value)?)?
    } else {
        bytes
    };
    Ok(pass_reply(send_bytes(proxy, parts, body).await?))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inspected {
    Container,
    Exec,
}

/// `GET /containers/{id}/json` and `/exec/{id}/json` with `--rewrite-inspect` (spec §4.2,
/// §4.3): on a 200, show the weave address in `NetworkSettings`.
async fn inspect(
    proxy: &Proxy,
    req: Request<Incoming>,
    what: Inspected,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (parts, body) = req.into_parts();
    let again = same_request(&parts);
    let mut response = send_bytes(proxy, parts, collect_request(body).await?).await?;
    if response.status() != StatusCode::OK {
        return Ok(pass_reply(response));
    }
    let (mut reply_parts, reply_body) = response.into_parts();
    let mut bytes = collect_reply(reply_body).await?;
    let Ok(mut value) = serde_json::from_slice::<Value>(&bytes) else {
        return Ok(whole_reply(reply_parts, bytes));
    };
    if what == Inspected::Container {
        // A start in flight changes what this container looks like: answer with the state
        // after it (spec §4.2, commit 5eaff802).
        let id = value["Id"].as_str().unwrap_or_default().to_string();
        if !id.is_empty() && proxy.starts.wait(&id, proxy.attach_timeout).await {
            response = send_bytes(proxy, again, Bytes::new()).await?;
            if response.status() != StatusCode::OK {
                return Ok(pass_reply(response));
            }
            let (parts, body) = response.into_parts();
            reply_parts = parts;
            bytes = collect_reply(body).await?;
            match serde_json::from_slice::<Value>(&bytes) {
                Ok(v) => value = v,
                Err(_) => return Ok(whole_reply(reply_parts, bytes)),
            }
        }
    }
    let container = match what {
        Inspected::Container => Some(&value),
        Inspected::Exec => exec_inspect_container(&value),
    };
    let pid = container
        .and_then(|c| c["State"]["Pid"].as_i64())
        .and_then(|p| i32::try_from(p).ok())
        .unwrap_or(0);
    if pid <= 0 {
        return Ok(whole_reply(reply_parts, bytes));
    }
    let interface = match proxy.network.interfaces(pid).await {
        Ok(Some(interface)) => interface,
        Ok(None) => return Ok(whole_reply(reply_parts, bytes)),
        Err(e) => {
            // No router (not launched yet, or stopped) is common: not worth a warning per
            // inspect.
            if matches!(e, ClientError::Unreachable { .. }) {
                debug!(pid, error = %e, "cannot look up the weave interface for inspect");
            } else {
                warn!(pid, error = %e, "cannot look up the weave interface for inspect");
            }
            return Ok(whole_reply(reply_parts, bytes));
        }
    };
    let addr = first_addr(&interface);
    let rewritten = match what {
        Inspected::Container => rewrite_inspect(value, &interface.mac, addr),
        Inspected::Exec => rewrite_exec_inspect(value, &interface.mac, addr),
    };
    Ok(whole_reply(reply_parts, to_json(&rewritten)?))
}

/// A reply with a body we hold whole: exact length, no chunking (spec §1.6.5).
fn whole_reply(mut parts: http::response::Parts, body: Bytes) -> Response<ProxyBody> {
    set_content_length(&mut parts.headers, body.len());
    downstream(Response::from_parts(parts, ()), full(body))
}

/// A copy of a bodiless request's head, to ask dockerd again.
fn same_request(parts: &Parts) -> Parts {
    let mut copy = Request::new(());
    *copy.method_mut() = parts.method.clone();
    *copy.uri_mut() = parts.uri.clone();
    *copy.version_mut() = parts.version;
    *copy.headers_mut() = parts.headers.clone();
    *copy.extensions_mut() = parts.extensions.clone();
    copy.into_parts().0
}
