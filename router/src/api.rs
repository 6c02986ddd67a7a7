//! The router's HTTP API (shell around a pure router of paths), on two listeners: TCP
//! 127.0.0.1:6784 serves the routes that only read (health, status, report, proxy addresses) to
//! anyone on the host; the unix socket (`/var/run/weave/router.sock`, root:docker 0660) serves
//! every route, and those that change the network only to root and the docker group (see
//! [`crate::access`]). Attach and detach act only on the process of a running container that
//! dockerd knows ([`crate::containers`]).
//!
//! Routes (bodies in [`crate::api_types`]; the client side is `weave_api::client`):
//! `GET /status`, `GET /status/{targets|connections|peers}` (text; 503 while not ready),
//! `GET /report` (indented JSON), `GET /proxyaddrs` (one per line; 404 without a proxy),
//! `POST /attach/{id}`, `POST /detach/{id}`, `GET /interfaces/{pid}`,
//! `GET /interfaces/weave:expose`, `POST /expose/{ip}/{len}[?skipNAT=true]` (204),
//! `DELETE /expose/{ip}/{len}` (204), `POST /connect` (form `peer=…` repeatable, `replace=true`;
//! 200, or 400 with one line per bad peer), `POST /forget` (form `peer=…`; 200), and `GET /` or
//! `GET /health` for readiness.
//! IPAM (spec ipam-dns-cli §1.9; 404 when `--ipalloc-range ""`): `POST|GET /ip/{id}[/{ip}/{len}]`
//! (allocate, lookup), `PUT /ip/{id}/{ip}/{len}` (claim), `DELETE /ip/{id}[/{ip}]`, `GET /ip`,
//! `GET /ipinfo/defaultsubnet`, `GET /ipinfo/tracker`, `GET /ring` (prime), `DELETE /peer`
//! (leave), `DELETE /peer/{name}` (rmpeer), `GET /status/ipam`. Attach resolves `net:` specs and
//! no address at all through IPAM, and claims explicit addresses, for the container's id.
//! Errors are `{"message": ...}`: 400 for bad input, 403 for a route this listener or client may
//! not use, 404 for unknown routes or absent things, 500 for operational failures.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::access::{self, Access};
use crate::addr::{AddrSpec, Ipv4Cidr};
use crate::api_types::{ApiError, AttachRequest, DetachRequest, DetachResponse};
use crate::bridge::BridgeError;
use crate::containers::{self, ContainerDirectory, ContainerError};
use crate::control::{ControlError, ControlHandle};
use crate::ipam_shell::{self, IpamCallError, IpamHandle};
use crate::status::{self, StatusSnapshot};

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;
/// How long open connections get to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The message for address specs that need IPAM when it is off.
pub const IPAM_UNAVAILABLE: &str = "IP address allocation (IPAM) must be enabled to use 'net:' \
     (weave was launched with --ipalloc-range \"\"): use an explicit address like 10.32.1.1/24";
/// `GET /interfaces/{target}` for the bridge itself.
pub const BRIDGE_TARGET: &str = "weave:expose";

/// Narrowest prefix accepted for an address on a weave interface or the bridge: wider ones
/// would route (and, exposed, masquerade) most of the Internet through the overlay.
pub const MIN_PREFIX_LEN: u8 = 8;

/// What the API needs: the bridge owner, the latest status, the mesh, and dockerd's view of
/// which containers exist.
pub(crate) struct ApiState {
    pub(crate) control: ControlHandle,
    pub(crate) status: watch::Receiver<StatusSnapshot>,
    pub(crate) mesh: crate::mesh_shell::MeshHandle,
    pub(crate) containers: Arc<dyn ContainerDirectory>,
    /// `None` when IPAM is off.
    pub(crate) ipam: Option<IpamHandle>,
}

/// The two listeners: TCP for reading, the unix socket (and its group) for everything.
pub(crate) struct Listeners {
    pub(crate) tcp: TcpListener,
    pub(crate) socket: UnixListener,
    pub(crate) socket_group: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StatusView {
    Summary,
    Targets,
    Connections,
    Peers,
    Ipam,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum InterfaceTarget {
    Pid(i32),
    Bridge,
}

/// A parsed request line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    Health,
    Status(StatusView),
    Report,
    ProxyAddrs,
    Attach {
        container: String,
    },
    Detach {
        container: String,
    },
    Interfaces(InterfaceTarget),
    Expose {
        cidr: Ipv4Cidr,
        skip_nat: bool,
    },
    Hide {
        cidr: Ipv4Cidr,
    },
    Connect,
    Forget,
    /// `POST /ip/{id}[/{subnet}]`.
    IpAllocate {
        ident: String,
        subnet: Option<Ipv4Cidr>,
    },
    /// `GET /ip/{id}[/{subnet}]`.
    IpLookup {
        ident: String,
        subnet: Option<Ipv4Cidr>,
    },
    /// `PUT /ip/{id}/{ip}/{len}`.
    IpClaim {
        ident: String,
        cidr: Ipv4Cidr,
    },
    /// `DELETE /ip/{id}/{ip}`.
    IpFree {
        ident: String,
        addr: std::net::Ipv4Addr,
    },
    /// `DELETE /ip/{id}`.
    IpDelete {
        ident: String,
    },
    /// `GET /ip`.
    IpOwned,
    IpDefaultSubnet,
    IpTracker,
    /// `GET /ring`.
    Prime,
    /// `DELETE /peer`.
    Leave,
    /// `DELETE /peer/{name}`.
    RmPeer {
        peer: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RouteError {
    NotFound(String),
    MethodNotAllowed(String),
    BadRequest(String),
}

impl Route {
    /// Does this route change the network (or enter other processes' namespaces)?
    pub(crate) fn needs_full_access(&self) -> bool {
        match self {
            Route::Health
            | Route::Status(_)
            | Route::Report
            | Route::ProxyAddrs
            | Route::IpLookup { .. }
            | Route::IpOwned
            | Route::IpDefaultSubnet
            | Route::IpTracker => false,
            Route::IpAllocate { .. }
            | Route::IpClaim { .. }
            | Route::IpFree { .. }
            | Route::IpDelete { .. }
            | Route::Prime
            | Route::Leave
            | Route::RmPeer { .. } => true,
            Route::Attach { .. }
            | Route::Detach { .. }
            | Route::Interfaces(_)
            | Route::Expose { .. }
            | Route::Hide { .. }
            | Route::Connect
            | Route::Forget => true,
        }
    }
}

impl RouteError {
    fn status(&self) -> StatusCode {
        match self {
            RouteError::NotFound(_) => StatusCode::NOT_FOUND,
            RouteError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            RouteError::BadRequest(_) => StatusCode::BAD_REQUEST,
        }
    }

    fn message(&self) -> &str {
        match self {
            RouteError::NotFound(m)
            | RouteError::MethodNotAllowed(m)
            | RouteError::BadRequest(m) => m,
        }
    }
}

/// Decode `%XX` escapes in one path segment; `None` for bad escapes or non-UTF-8.
fn percent_decode(segment: &str) -> Option<String> {
    if !segment.contains('%') {
        return Some(segment.to_string());
    }
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `skipNAT` from a query string (absent → false).
fn skip_nat(query: Option<&str>) -> Result<bool, RouteError> {
    let mut skip = false;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, "true"));
        if key != "skipNAT" {
            continue;
        }
        skip = match value {
            "true" | "1" | "" => true,
            "false" | "0" => false,
            other => {
                return Err(RouteError::BadRequest(format!(
                    "invalid skipNAT value {other:?}: expected true or false"
                )))
            }
        };
    }
    Ok(skip)
}

fn container_id(raw: &str) -> Result<String, RouteError> {
    if raw.is_empty() || raw.len() > 256 || raw.chars().any(char::is_control) {
        return Err(RouteError::BadRequest(format!(
            "invalid container id {raw:?}"
        )));
    }
    Ok(raw.to_string())
}

fn parse_pid(raw: &str) -> Result<i32, RouteError> {
    match raw.parse::<i32>() {
        Ok(pid) if pid > 0 => Ok(pid),
        _ => Err(RouteError::BadRequest(format!(
            "invalid pid {raw:?}: expected a positive process id or {BRIDGE_TARGET}"
        ))),
    }
}

fn parse_cidr(ip: &str, len: &str) -> Result<Ipv4Cidr, RouteError> {
    format!("{ip}/{len}")
        .parse()
        .map_err(|e: crate::addr::AddrError| RouteError::BadRequest(e.to_string()))
}

/// Map a request line to a [`Route`] (pure).
pub(crate) fn parse_route(
    method: &Method,
    path: &str,
    query: Option<&str>,
) -> Result<Route, RouteError> {
    let not_found = || RouteError::NotFound(format!("no such route: {method} {path}"));
    let raw = path.strip_prefix('/').ok_or_else(not_found)?;
    let segments = raw
        .split('/')
        .map(percent_decode)
        .collect::<Option<Vec<String>>>()
        .ok_or_else(|| RouteError::BadRequest(format!("invalid escape in path {path:?}")))?;
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    let (allowed, route): (&[Method], Result<Route, RouteError>) = match segs.as_slice() {
        [""] | ["health"] => (&[Method::GET], Ok(Route::Health)),
        ["status"] => (&[Method::GET], Ok(Route::Status(StatusView::Summary))),
        ["status", view] => {
            let view = match *view {
                "targets" => StatusView::Targets,
                "connections" => StatusView::Connections,
                "peers" => StatusView::Peers,
                "ipam" => StatusView::Ipam,
                _ => return Err(not_found()),
            };
            (&[Method::GET], Ok(Route::Status(view)))
        }
        ["report"] => (&[Method::GET], Ok(Route::Report)),
        ["proxyaddrs"] => (&[Method::GET], Ok(Route::ProxyAddrs)),
        ["connect"] => (&[Method::POST], Ok(Route::Connect)),
        ["forget"] => (&[Method::POST], Ok(Route::Forget)),
        ["attach", id] => (
            &[Method::POST],
            container_id(id).map(|container| Route::Attach { container }),
        ),
        ["detach", id] => (
            &[Method::POST],
            container_id(id).map(|container| Route::Detach { container }),
        ),
        ["ip"] => (&[Method::GET], Ok(Route::IpOwned)),
        ["ip", id] => {
            let ident = container_id(id);
            let route = match *method {
                Method::POST => ident.map(|ident| Route::IpAllocate {
                    ident,
                    subnet: None,
                }),
                Method::DELETE => ident.map(|ident| Route::IpDelete { ident }),
                _ => ident.map(|ident| Route::IpLookup {
                    ident,
                    subnet: None,
                }),
            };
            (&[Method::GET, Method::POST, Method::DELETE], route)
        }
        ["ip", id, ip] => {
            let route = container_id(id).and_then(|ident| {
                let addr = ip
                    .parse()
                    .map_err(|_| RouteError::BadRequest(format!("invalid IP address {ip:?}")))?;
                Ok(Route::IpFree { ident, addr })
            });
            (&[Method::DELETE], route)
        }
        ["ip", id, ip, len] => {
            let route = container_id(id).and_then(|ident| {
                if *method == Method::PUT {
                    return Ok(Route::IpClaim {
                        ident,
                        cidr: parse_cidr(ip, len)?,
                    });
                }
                let subnet = ipam_shell::parse_subnet("subnet", &format!("{ip}/{len}"))
                    .map_err(|e| RouteError::BadRequest(e.to_string()))?;
                Ok(if *method == Method::POST {
                    Route::IpAllocate {
                        ident,
                        subnet: Some(subnet),
                    }
                } else {
                    Route::IpLookup {
                        ident,
                        subnet: Some(subnet),
                    }
                })
            });
            (&[Method::GET, Method::POST, Method::PUT], route)
        }
        ["ipinfo", "defaultsubnet"] => (&[Method::GET], Ok(Route::IpDefaultSubnet)),
        ["ipinfo", "tracker"] => (&[Method::GET], Ok(Route::IpTracker)),
        ["ring"] => (&[Method::GET], Ok(Route::Prime)),
        ["peer"] => (&[Method::DELETE], Ok(Route::Leave)),
        ["peer", peer] => (
            &[Method::DELETE],
            container_id(peer).map(|peer| Route::RmPeer { peer }),
        ),
        ["interfaces", target] => {
            let target = if *target == BRIDGE_TARGET {
                Ok(InterfaceTarget::Bridge)
            } else {
                parse_pid(target).map(InterfaceTarget::Pid)
            };
            (&[Method::GET], target.map(Route::Interfaces))
        }
        ["expose", ip, len] => {
            let cidr = parse_cidr(ip, len);
            let route = if method == Method::DELETE {
                cidr.map(|cidr| Route::Hide { cidr })
            } else {
                cidr.and_then(|cidr| {
                    Ok(Route::Expose {
                        cidr,
                        skip_nat: skip_nat(query)?,
                    })
                })
            };
            (&[Method::POST, Method::DELETE], route)
        }
        _ => return Err(not_found()),
    };
    if !allowed.contains(method) {
        return Err(RouteError::MethodNotAllowed(format!(
            "method {method} not allowed on {path}"
        )));
    }
    route
}

/// Is this address usable on an interface (a weave interface or the bridge)?
pub(crate) fn usable(cidr: &Ipv4Cidr) -> Result<(), String> {
    let ip = cidr.addr;
    if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() || ip.is_broadcast() {
        return Err(format!("{cidr} is not a usable host address"));
    }
    if cidr.prefix_len < MIN_PREFIX_LEN {
        return Err(format!(
            "{cidr}: prefix /{} is too wide; weave subnets need /{MIN_PREFIX_LEN} or longer",
            cidr.prefix_len
        ));
    }
    // In subnets with room for hosts, the first and last addresses are not host addresses.
    if cidr.prefix_len <= 30 {
        let host_bits = u32::from(ip) & !cidr.mask();
        if host_bits == 0 || host_bits == !cidr.mask() {
            return Err(format!(
                "{cidr} is the network or broadcast address of its subnet, not a host address"
            ));
        }
    }
    Ok(())
}

/// The specs with explicit addresses checked (deduplicated, order kept); `net:` ones are
/// resolved through IPAM later.
pub(crate) fn checked_specs(specs: &[AddrSpec]) -> Result<Vec<AddrSpec>, String> {
    let mut out: Vec<AddrSpec> = Vec::with_capacity(specs.len());
    for spec in specs {
        if let AddrSpec::Explicit(cidr) = spec {
            usable(cidr)?;
        }
        if !out.contains(spec) {
            out.push(*spec);
        }
    }
    Ok(out)
}

fn check_pid(pid: i32) -> Result<(), String> {
    if pid <= 0 {
        return Err(format!("invalid pid {pid}: must be greater than 0"));
    }
    Ok(())
}

/// The addresses an attach asks for; none at all means one from the default subnet.
pub(crate) fn validate_attach(req: &AttachRequest) -> Result<Vec<AddrSpec>, String> {
    check_pid(req.pid)?;
    if req.addrs.is_empty() {
        return Ok(vec![AddrSpec::DefaultSubnet]);
    }
    checked_specs(&req.addrs)
}

/// The addresses a detach removes (empty = all).
pub(crate) fn validate_detach(req: &DetachRequest) -> Result<Vec<AddrSpec>, String> {
    check_pid(req.pid)?;
    checked_specs(&req.addrs)
}

/// An IPAM failure as HTTP: a cancelled request is a 200 `cancelled` (Weave's contract).
fn ipam_error(prefix: &str, e: IpamCallError) -> Resp {
    match e {
        IpamCallError::Cancelled => text(StatusCode::OK, "cancelled".to_string()),
        IpamCallError::Failed(why) => text(StatusCode::BAD_REQUEST, format!("{prefix}{why}\n")),
        IpamCallError::Stopped => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// The addresses for an attach of container `ident`: explicit ones claimed (so IPAM never hands
/// them out), `net:` ones allocated. Without IPAM only explicit ones are possible.
async fn resolve_attach(
    ipam: Option<&IpamHandle>,
    ident: &str,
    specs: &[AddrSpec],
) -> Result<Vec<Ipv4Cidr>, Resp> {
    let mut out = Vec::with_capacity(specs.len());
    for spec in specs {
        let cidr = match (spec, ipam) {
            (AddrSpec::Explicit(cidr), None) => *cidr,
            (_, None) => return Err(error(StatusCode::BAD_REQUEST, IPAM_UNAVAILABLE)),
            (AddrSpec::Explicit(cidr), Some(ipam)) => {
                ipam.claim(ident, *cidr, false)
                    .await
                    .map_err(|e| attach_ipam_error(&format!("Unable to claim {cidr}: "), e))?;
                *cidr
            }
            (AddrSpec::Subnet(subnet), Some(ipam)) => ipam
                .allocate(ident, Some(*subnet))
                .await
                .map_err(|e| attach_ipam_error("Unable to allocate an address: ", e))?,
            (AddrSpec::DefaultSubnet, Some(ipam)) => ipam
                .allocate(ident, None)
                .await
                .map_err(|e| attach_ipam_error("Unable to allocate an address: ", e))?,
        };
        if !out.contains(&cidr) {
            out.push(cidr);
        }
    }
    Ok(out)
}

fn attach_ipam_error(prefix: &str, e: IpamCallError) -> Resp {
    match e {
        IpamCallError::Cancelled => error(
            StatusCode::CONFLICT,
            "the container stopped before it got its address",
        ),
        IpamCallError::Failed(why) => error(StatusCode::BAD_REQUEST, format!("{prefix}{why}")),
        IpamCallError::Stopped => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// The explicit addresses a detach names, `net:` ones looked up in IPAM.
async fn resolve_detach(
    ipam: Option<&IpamHandle>,
    ident: &str,
    specs: &[AddrSpec],
) -> Result<Vec<Ipv4Cidr>, Resp> {
    let mut out: Vec<Ipv4Cidr> = Vec::new();
    for spec in specs {
        let found = match (spec, ipam) {
            (AddrSpec::Explicit(cidr), _) => Ok(vec![*cidr]),
            (_, None) => return Err(error(StatusCode::BAD_REQUEST, IPAM_UNAVAILABLE)),
            (AddrSpec::Subnet(subnet), Some(ipam)) => ipam.lookup(ident, Some(*subnet)).await,
            (AddrSpec::DefaultSubnet, Some(ipam)) => ipam.lookup(ident, None).await,
        }
        .map_err(|e| error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
        for cidr in found {
            if !out.contains(&cidr) {
                out.push(cidr);
            }
        }
    }
    Ok(out)
}

/// `check-alive=true`: is the container gone or stopped (then the request is cancelled)?
async fn not_alive(containers: &dyn ContainerDirectory, ident: &str) -> bool {
    if ident == ipam_shell::EXPOSE_IDENT || ident == "_" {
        return false;
    }
    matches!(
        containers.lookup(ident).await,
        Ok(None) | Ok(Some(containers::ContainerProcess { running: false, .. }))
    )
}

fn form_flag(pairs: &[(String, String)], key: &str) -> bool {
    form_values(pairs, key)
        .iter()
        .any(|v| v == "true" || v == "1")
}

/// The IPAM routes (IPAM is on).
async fn handle_ipam(
    state: &ApiState,
    ipam: &IpamHandle,
    route: Route,
    req: Request<Incoming>,
) -> Resp {
    let query = req.uri().query().map(str::to_string);
    let pairs = match read_form(req.into_body(), query.as_deref()).await {
        Ok(pairs) => pairs,
        Err(resp) => return resp,
    };
    let check_alive = form_flag(&pairs, "check-alive");
    match route {
        Route::IpAllocate { ident, subnet } => {
            if check_alive && not_alive(&*state.containers, &ident).await {
                return text(StatusCode::OK, "cancelled".to_string());
            }
            match ipam.allocate(&ident, subnet).await {
                Ok(cidr) => text(StatusCode::OK, cidr.to_string()),
                Err(e) => ipam_error("", e),
            }
        }
        Route::IpLookup { ident, subnet } => match ipam.lookup(&ident, subnet).await {
            Ok(found) => text(
                StatusCode::OK,
                found
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            Err(e) => ipam_error("", e),
        },
        Route::IpClaim { ident, cidr } => {
            if check_alive && not_alive(&*state.containers, &ident).await {
                return text(StatusCode::OK, "cancelled".to_string());
            }
            let no_error = form_flag(&pairs, "noErrorOnUnknown");
            match ipam.claim(&ident, cidr, no_error).await {
                Ok(()) => no_content(),
                Err(e) => ipam_error("Unable to claim: ", e),
            }
        }
        Route::IpFree { ident, addr } => match ipam.free(&ident, addr).await {
            Ok(()) => no_content(),
            Err(e) => ipam_error("Unable to free: ", e),
        },
        Route::IpDelete { ident } => match ipam.delete(&ident).await {
            Ok(()) => no_content(),
            Err(e) => ipam_error("", e),
        },
        Route::IpOwned => match ipam.owned().await {
            Ok(owned) => {
                let owned: Vec<serde_json::Value> = owned
                    .into_iter()
                    .map(|(id, addrs)| {
                        serde_json::json!({
                            "containerid": id,
                            "addrs": addrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                json(StatusCode::OK, &serde_json::json!({ "owned": owned }))
            }
            Err(e) => ipam_error("", e),
        },
        Route::IpDefaultSubnet => text(StatusCode::OK, ipam.settings().default_subnet.to_string()),
        Route::IpTracker => text(StatusCode::OK, "\n".to_string()),
        Route::Prime => match ipam.prime().await {
            Ok(()) => text(StatusCode::OK, String::new()),
            Err(e) => ipam_error("", e),
        },
        Route::Leave => match ipam.leave().await {
            Ok(()) => no_content(),
            Err(e) => ipam_error("", e),
        },
        Route::RmPeer { peer } => match ipam.rmpeer(&peer).await {
            Ok(n) => text(StatusCode::OK, format!("{n} IPs taken over from {peer}\n")),
            Err(e) => ipam_error("", e),
        },
        _ => error(StatusCode::NOT_FOUND, "not an IPAM route"),
    }
}

fn is_ipam_route(route: &Route) -> bool {
    matches!(
        route,
        Route::IpAllocate { .. }
            | Route::IpLookup { .. }
            | Route::IpClaim { .. }
            | Route::IpFree { .. }
            | Route::IpDelete { .. }
            | Route::IpOwned
            | Route::IpDefaultSubnet
            | Route::IpTracker
            | Route::Prime
            | Route::Leave
            | Route::RmPeer { .. }
            | Route::Status(StatusView::Ipam)
    )
}

fn container_status(e: &ContainerError) -> StatusCode {
    match e {
        ContainerError::Unknown(_) => StatusCode::NOT_FOUND,
        ContainerError::NotRunning(_) => StatusCode::CONFLICT,
        ContainerError::WrongPid { .. } => StatusCode::BAD_REQUEST,
        ContainerError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
    }
}

fn control_status(e: &ControlError) -> StatusCode {
    match e {
        ControlError::Bridge(
            BridgeError::InvalidPid(_) | BridgeError::HostNetns { .. } | BridgeError::InvalidMtu(_),
        ) => StatusCode::BAD_REQUEST,
        ControlError::Bridge(BridgeError::NoSuchProcess { .. }) => StatusCode::NOT_FOUND,
        ControlError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

type Resp = Response<Full<Bytes>>;

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Resp {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    if let Ok(value) = header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    resp
}

fn text(status: StatusCode, body: String) -> Resp {
    respond(status, "text/plain; charset=utf-8", body)
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Resp {
    match serde_json::to_vec(value) {
        Ok(body) => respond(status, "application/json", body),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding reply: {e}"),
        ),
    }
}

/// Indented with four spaces, like Go's `json.MarshalIndent(v, "", "    ")`.
fn json_pretty<T: Serialize>(status: StatusCode, value: &T) -> Resp {
    let mut body = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut body, formatter);
    match value.serialize(&mut ser) {
        Ok(()) => {
            body.push(b'\n');
            respond(status, "application/json", body)
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding report: {e}"),
        ),
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Resp {
    let message = message.into();
    if status.is_server_error() {
        tracing::warn!(%status, %message, "API request failed");
    } else {
        tracing::debug!(%status, %message, "API request refused");
    }
    json(status, &ApiError { message })
}

fn no_content() -> Resp {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::NO_CONTENT;
    resp
}

/// Decode one `application/x-www-form-urlencoded` component (`+` is a space).
fn form_decode(s: &str) -> Option<String> {
    percent_decode(&s.replace('+', " "))
}

/// `(key, value)` pairs of a form body or query string.
pub(crate) fn parse_form(body: &str) -> Result<Vec<(String, String)>, String> {
    body.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match (form_decode(k), form_decode(v)) {
                (Some(k), Some(v)) => Ok((k, v)),
                _ => Err(format!("invalid form encoding in {pair:?}")),
            }
        })
        .collect()
}

/// The form of a `/connect` or `/forget` request: the body, plus the query string.
async fn read_form(body: Incoming, query: Option<&str>) -> Result<Vec<(String, String)>, Resp> {
    let bytes = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                format!("reading request body: {e}"),
            )
        })?
        .to_bytes();
    let text = String::from_utf8(bytes.to_vec())
        .map_err(|_| error(StatusCode::BAD_REQUEST, "request body is not UTF-8"))?;
    let mut pairs =
        parse_form(query.unwrap_or("")).map_err(|e| error(StatusCode::BAD_REQUEST, e))?;
    pairs.extend(parse_form(text.trim()).map_err(|e| error(StatusCode::BAD_REQUEST, e))?);
    Ok(pairs)
}

fn form_values(pairs: &[(String, String)], key: &str) -> Vec<String> {
    pairs
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .collect()
}

fn mesh_error(e: crate::mesh_shell::MeshError) -> Resp {
    match e {
        crate::mesh_shell::MeshError::InvalidPeers(_) => {
            text(StatusCode::BAD_REQUEST, format!("{e}\n"))
        }
        crate::mesh_shell::MeshError::Stopped => {
            error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
    }
}

/// Read a capped JSON body.
async fn read_json<T: DeserializeOwned>(body: Incoming) -> Result<T, Resp> {
    let bytes = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("request body larger than {MAX_BODY} bytes"),
            ))
        }
        Err(e) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("reading request body: {e}"),
            ))
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {e}"),
        )
    })
}

async fn handle(state: &ApiState, access: Access, req: Request<Incoming>) -> Resp {
    let route = match parse_route(req.method(), req.uri().path(), req.uri().query()) {
        Ok(route) => route,
        Err(e) => return error(e.status(), e.message()),
    };
    if route.needs_full_access() && access != Access::Full {
        return error(
            StatusCode::FORBIDDEN,
            format!(
                "{} {} changes the weave network: it is served only on the router's unix socket, to root and the docker group",
                req.method(),
                req.uri().path()
            ),
        );
    }
    if is_ipam_route(&route) && state.ipam.is_none() {
        return error(
            StatusCode::NOT_FOUND,
            "IP address allocation is not enabled (weave was launched with --ipalloc-range \"\")",
        );
    }
    match route {
        Route::Health => text(StatusCode::OK, "ok\n".to_string()),
        Route::Status(view) => {
            let snapshot = state.status.borrow().clone();
            let ipam = state.ipam.as_ref().map(IpamHandle::status);
            let body = match (view, &ipam) {
                (StatusView::Summary, _) => {
                    let sections: Vec<String> =
                        ipam.iter().map(ipam_shell::render_section).collect();
                    status::render_status_with(&snapshot, &sections)
                }
                (StatusView::Targets, _) => status::render_targets(&snapshot),
                (StatusView::Connections, _) => status::render_connections(&snapshot),
                (StatusView::Peers, _) => status::render_peers(&snapshot),
                (StatusView::Ipam, Some(ipam)) => {
                    ipam_shell::render_peers(ipam, &snapshot.router.name)
                }
                (StatusView::Ipam, None) => String::new(),
            };
            let code = if snapshot.ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(code, body)
        }
        Route::Report => {
            let snapshot = state.status.borrow().clone();
            let mut report = status::report(&snapshot);
            if let (Some(ipam), serde_json::Value::Object(map)) = (&state.ipam, &mut report) {
                map.insert("IPAM".into(), ipam.status());
            }
            json_pretty(StatusCode::OK, &report)
        }
        Route::ProxyAddrs => {
            let addrs = state
                .status
                .borrow()
                .proxy
                .as_ref()
                .map(|p| p.addresses.clone())
                .unwrap_or_default();
            if addrs.is_empty() {
                return error(StatusCode::NOT_FOUND, "the proxy is not running");
            }
            text(
                StatusCode::OK,
                addrs.iter().map(|a| format!("{a}\n")).collect(),
            )
        }
        Route::Attach { container } => {
            let body: AttachRequest = match read_json(req.into_body()).await {
                Ok(body) => body,
                Err(resp) => return resp,
            };
            let specs = match validate_attach(&body) {
                Ok(specs) => specs,
                Err(message) => return error(StatusCode::BAD_REQUEST, message),
            };
            if state.ipam.is_none() && specs.iter().any(|s| !matches!(s, AddrSpec::Explicit(_))) {
                return error(StatusCode::BAD_REQUEST, IPAM_UNAVAILABLE);
            }
            let found = match containers::verify(&*state.containers, &container, body.pid).await {
                Ok(found) => found,
                Err(e) => return error(container_status(&e), e.to_string()),
            };
            let addrs = match resolve_attach(state.ipam.as_ref(), &found.id, &specs).await {
                Ok(addrs) => addrs,
                Err(resp) => return resp,
            };
            tracing::debug!(%container, pid = body.pid, ?addrs, "attach");
            match state
                .control
                .attach(body.pid, addrs, body.no_multicast_route, body.keep_tx_on)
                .await
            {
                Ok(resp) => json(StatusCode::OK, &resp),
                Err(e) => error(control_status(&e), e.to_string()),
            }
        }
        Route::Detach { container } => {
            let body: DetachRequest = match read_json(req.into_body()).await {
                Ok(body) => body,
                Err(resp) => return resp,
            };
            let specs = match validate_detach(&body) {
                Ok(specs) => specs,
                Err(message) => return error(StatusCode::BAD_REQUEST, message),
            };
            let found = match containers::verify(&*state.containers, &container, body.pid).await {
                Ok(found) => found,
                Err(e) => return error(container_status(&e), e.to_string()),
            };
            let addrs = match resolve_detach(state.ipam.as_ref(), &found.id, &specs).await {
                Ok(addrs) => addrs,
                Err(resp) => return resp,
            };
            if !specs.is_empty() && addrs.is_empty() {
                // `net:` specs that IPAM knows nothing of: nothing to remove.
                return json(
                    StatusCode::OK,
                    &DetachResponse {
                        removed: Vec::new(),
                    },
                );
            }
            tracing::debug!(%container, pid = body.pid, "detach");
            match state.control.detach(body.pid, addrs).await {
                Ok(removed) => {
                    release(state.ipam.as_ref(), &found.id, &removed).await;
                    json(
                        StatusCode::OK,
                        &DetachResponse {
                            removed: removed.iter().map(ToString::to_string).collect(),
                        },
                    )
                }
                Err(e) => error(control_status(&e), e.to_string()),
            }
        }
        Route::Interfaces(target) => {
            let found = match target {
                InterfaceTarget::Pid(pid) => state.control.interface(pid).await,
                InterfaceTarget::Bridge => state.control.bridge_interface().await,
            };
            match found {
                Ok(Some(info)) => json(StatusCode::OK, &info),
                Ok(None) => error(StatusCode::NOT_FOUND, "no weave interface"),
                Err(e) => error(control_status(&e), e.to_string()),
            }
        }
        Route::Expose { cidr, skip_nat } => {
            if let Err(message) = usable(&cidr) {
                return error(StatusCode::BAD_REQUEST, message);
            }
            match state.control.expose(cidr, skip_nat).await {
                Ok(()) => no_content(),
                Err(e) => error(control_status(&e), e.to_string()),
            }
        }
        Route::Hide { cidr } => match state.control.hide(cidr).await {
            Ok(()) => no_content(),
            Err(e) => error(control_status(&e), e.to_string()),
        },
        Route::IpAllocate { .. }
        | Route::IpLookup { .. }
        | Route::IpClaim { .. }
        | Route::IpFree { .. }
        | Route::IpDelete { .. }
        | Route::IpOwned
        | Route::IpDefaultSubnet
        | Route::IpTracker
        | Route::Prime
        | Route::Leave
        | Route::RmPeer { .. } => match &state.ipam {
            Some(ipam) => handle_ipam(state, ipam, route, req).await,
            None => error(
                StatusCode::NOT_FOUND,
                "IP address allocation is not enabled",
            ),
        },
        Route::Connect | Route::Forget => {
            let query = req.uri().query().map(str::to_string);
            let pairs = match read_form(req.into_body(), query.as_deref()).await {
                Ok(pairs) => pairs,
                Err(resp) => return resp,
            };
            let peers = form_values(&pairs, "peer");
            let result = if route == Route::Connect {
                let replace = form_values(&pairs, "replace")
                    .iter()
                    .any(|v| v == "true" || v == "1");
                state.mesh.connect(&peers, replace).await
            } else {
                state.mesh.forget(&peers).await
            };
            match result {
                Ok(()) => text(StatusCode::OK, String::new()),
                Err(e) => mesh_error(e),
            }
        }
    }
}

/// Give IPAM back the addresses a detach removed (those it never handed out are not found:
/// fine).
async fn release(ipam: Option<&IpamHandle>, ident: &str, removed: &[Ipv4Cidr]) {
    let Some(ipam) = ipam else { return };
    for cidr in removed {
        if let Err(e) = ipam.free(ident, cidr.addr).await {
            tracing::debug!(ident, %cidr, error = %e, "not released in IPAM");
        }
    }
}

/// Serve the API on both listeners until `shutdown` resolves, then give open connections a
/// short grace period.
pub(crate) async fn serve(
    listeners: Listeners,
    state: ApiState,
    shutdown: impl Future<Output = ()>,
) {
    let Listeners {
        tcp,
        socket,
        socket_group,
    } = listeners;
    let state = Arc::new(state);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = tcp.accept() => match accepted {
                Ok((stream, peer)) => {
                    let span = tracing::debug_span!("api_conn", %peer);
                    let conn = serve_conn(stream, Access::ReadOnly, state.clone(), stop_rx.clone());
                    conns.spawn(conn.instrument(span));
                }
                Err(e) => accept_failed(e).await,
            },
            accepted = socket.accept() => match accepted {
                Ok((stream, _)) => {
                    let access = access::socket_access(&stream, socket_group);
                    let span = tracing::debug_span!("api_conn", peer = "unix", ?access);
                    let conn = serve_conn(stream, access, state.clone(), stop_rx.clone());
                    conns.spawn(conn.instrument(span));
                }
                Err(e) => accept_failed(e).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(tcp);
    drop(socket);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::debug!("closing API connections that did not finish in time");
    }
}

/// Out of fds or similar: back off instead of spinning.
async fn accept_failed(e: std::io::Error) {
    tracing::warn!(error = %e, "API accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

async fn serve_conn<S>(
    stream: S,
    access: Access,
    state: Arc<ApiState>,
    mut stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<Incoming>| {
        let state = state.clone();
        let span = tracing::debug_span!("api", method = %req.method(), path = %req.uri().path());
        async move { Ok::<_, Infallible>(handle(&state, access, req).await) }.instrument(span)
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "API connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Ipv4Cidr {
        s.parse().expect("valid cidr")
    }

    #[test]
    fn routes() {
        let get = Method::GET;
        let post = Method::POST;
        let ok = |m: &Method, p: &str, q: Option<&str>| parse_route(m, p, q).expect(p);
        assert_eq!(ok(&get, "/", None), Route::Health);
        assert_eq!(
            ok(&get, "/status", None),
            Route::Status(StatusView::Summary)
        );
        assert_eq!(
            ok(&get, "/status/targets", None),
            Route::Status(StatusView::Targets)
        );
        assert_eq!(
            ok(&get, "/status/connections", None),
            Route::Status(StatusView::Connections)
        );
        assert_eq!(
            ok(&get, "/status/peers", None),
            Route::Status(StatusView::Peers)
        );
        assert_eq!(ok(&get, "/report", Some("format=x")), Route::Report);
        assert_eq!(ok(&get, "/proxyaddrs", None), Route::ProxyAddrs);
        assert_eq!(
            ok(&post, "/attach/5245643870f1", None),
            Route::Attach {
                container: "5245643870f1".into()
            }
        );
        assert_eq!(
            ok(&post, "/detach/abc", None),
            Route::Detach {
                container: "abc".into()
            }
        );
        assert_eq!(
            ok(&get, "/interfaces/1234", None),
            Route::Interfaces(InterfaceTarget::Pid(1234))
        );
        assert_eq!(
            ok(&get, "/interfaces/weave:expose", None),
            Route::Interfaces(InterfaceTarget::Bridge)
        );
        assert_eq!(
            ok(&get, "/interfaces/weave%3Aexpose", None),
            Route::Interfaces(InterfaceTarget::Bridge)
        );
        assert_eq!(
            ok(&post, "/expose/10.2.1.1/24", None),
            Route::Expose {
                cidr: cidr("10.2.1.1/24"),
                skip_nat: false
            }
        );
        assert_eq!(
            ok(&post, "/expose/10.2.1.1/24", Some("skipNAT=true")),
            Route::Expose {
                cidr: cidr("10.2.1.1/24"),
                skip_nat: true
            }
        );
        assert_eq!(
            ok(&Method::DELETE, "/expose/10.2.1.1/24", None),
            Route::Hide {
                cidr: cidr("10.2.1.1/24")
            }
        );
    }

    #[test]
    fn route_errors() {
        let get = Method::GET;
        let post = Method::POST;
        let err = |m: &Method, p: &str, q: Option<&str>| {
            parse_route(m, p, q).expect_err(p).status().as_u16()
        };
        assert_eq!(err(&get, "/nope", None), 404);
        assert_eq!(err(&get, "/status/dns", None), 404);
        assert_eq!(err(&get, "/status/", None), 404);
        assert_eq!(err(&get, "/attach/x/y", None), 404);
        assert_eq!(err(&get, "relative", None), 404);
        assert_eq!(err(&get, "/attach/abc", None), 405);
        assert_eq!(err(&post, "/status", None), 405);
        assert_eq!(err(&Method::PUT, "/expose/10.2.1.1/24", None), 405);
        assert_eq!(err(&post, "/attach/", None), 400);
        assert_eq!(err(&get, "/interfaces/0", None), 400);
        assert_eq!(err(&get, "/interfaces/-3", None), 400);
        assert_eq!(err(&get, "/interfaces/abc", None), 400);
        assert_eq!(err(&post, "/expose/10.2.1/24", None), 400);
        assert_eq!(err(&post, "/expose/10.2.1.1/33", None), 400);
        assert_eq!(
            err(&post, "/expose/10.2.1.1/24", Some("skipNAT=maybe")),
            400
        );
        assert_eq!(err(&get, "/interfaces/%zz", None), 400);
        assert_eq!(err(&get, "/interfaces/%ff", None), 400);
    }

    #[test]
    fn attach_validation() {
        let req = |pid: i32, addrs: &[&str]| AttachRequest {
            pid,
            addrs: addrs
                .iter()
                .map(|a| a.parse().expect("valid spec"))
                .collect(),
            no_multicast_route: false,
            keep_tx_on: false,
        };
        let explicit = |s: &str| AddrSpec::Explicit(cidr(s));
        assert_eq!(
            validate_attach(&req(10, &["10.2.1.1/24", "ip:10.2.1.1/24", "10.2.2.1/24"])),
            Ok(vec![explicit("10.2.1.1/24"), explicit("10.2.2.1/24")])
        );
        // `net:` forms and no address at all go to IPAM.
        assert_eq!(
            validate_attach(&req(10, &["10.2.1.1/24", "net:default"])),
            Ok(vec![explicit("10.2.1.1/24"), AddrSpec::DefaultSubnet])
        );
        assert_eq!(
            validate_attach(&req(10, &["net:10.2.0.0/16"])),
            Ok(vec![AddrSpec::Subnet(cidr("10.2.0.0/16"))])
        );
        assert_eq!(
            validate_attach(&req(10, &[])),
            Ok(vec![AddrSpec::DefaultSubnet])
        );
        assert!(validate_attach(&req(0, &["10.2.1.1/24"])).is_err());
        assert!(validate_attach(&req(-5, &["10.2.1.1/24"])).is_err());
        for bad in [
            "0.0.0.0/8",
            "224.0.0.1/4",
            "127.0.0.1/8",
            "255.255.255.255/32",
        ] {
            assert!(validate_attach(&req(10, &[bad])).is_err(), "{bad}");
        }
    }

    #[test]
    fn detach_validation() {
        let req = |pid: i32, addrs: &[&str]| DetachRequest {
            pid,
            addrs: addrs
                .iter()
                .map(|a| a.parse().expect("valid spec"))
                .collect(),
        };
        assert_eq!(validate_detach(&req(10, &[])), Ok(vec![]));
        assert_eq!(
            validate_detach(&req(10, &["10.2.1.1/24"])),
            Ok(vec![AddrSpec::Explicit(cidr("10.2.1.1/24"))])
        );
        assert_eq!(
            validate_detach(&req(10, &["net:default"])),
            Ok(vec![AddrSpec::DefaultSubnet])
        );
        assert!(validate_detach(&req(0, &[])).is_err());
    }

    #[test]
    fn bodies_decode_strictly() {
        let bad: Result<AttachRequest, _> = serde_json::from_str(r#"{"pid": "x", "addrs": []}"#);
        assert!(bad.is_err());
        let bad: Result<AttachRequest, _> =
            serde_json::from_str(r#"{"pid": 3, "addrs": ["10.2.1.1"]}"#);
        assert!(bad.is_err());
        let good: AttachRequest =
            serde_json::from_str(r#"{"pid": 3, "addrs": ["10.2.1.1/24"]}"#).expect("valid body");
        assert!(!good.no_multicast_route && !good.keep_tx_on);
    }

    #[test]
    fn error_statuses() {
        let status = |e: BridgeError| control_status(&ControlError::Bridge(e)).as_u16();
        assert_eq!(status(BridgeError::HostNetns { pid: 1 }), 400);
        assert_eq!(status(BridgeError::InvalidPid(0)), 400);
        assert_eq!(status(BridgeError::NoSuchProcess { pid: 9 }), 404);
        assert_eq!(
            status(BridgeError::NoBridge {
                name: "weave".into()
            }),
            500
        );
        assert_eq!(control_status(&ControlError::Stopped).as_u16(), 503);
    }

    #[test]
    fn forms() {
        assert_eq!(
            parse_form("peer=10.0.0.1&peer=host%3A6783&replace=true&x=a+b"),
            Ok(vec![
                ("peer".to_string(), "10.0.0.1".to_string()),
                ("peer".to_string(), "host:6783".to_string()),
                ("replace".to_string(), "true".to_string()),
                ("x".to_string(), "a b".to_string()),
            ])
        );
        assert_eq!(parse_form(""), Ok(vec![]));
        assert!(parse_form("peer=%zz").is_err());
        let post = Method::POST;
        assert_eq!(parse_route(&post, "/connect", None), Ok(Route::Connect));
        assert_eq!(parse_route(&post, "/forget", None), Ok(Route::Forget));
        assert!(parse_route(&Method::GET, "/connect", None).is_err());
    }

    #[test]
    fn host_addresses_only_in_subnets_narrower_than_a_slash_8() {
        for ok in [
            "10.2.1.1/24",
            "10.32.0.1/12",
            "10.0.0.1/8",
            "10.2.1.7/32",
            "10.2.1.6/31",
        ] {
            assert_eq!(usable(&cidr(ok)), Ok(()), "{ok}");
        }
        for bad in [
            "10.2.1.1/0",
            "10.2.1.1/7",
            "10.2.1.0/24",
            "10.2.1.255/24",
            "10.47.255.255/12",
            "0.0.0.0/24",
            "224.0.0.1/24",
            "127.0.0.1/8",
        ] {
            assert!(usable(&cidr(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_reading_routes_are_open_to_everyone() {
        let get = Method::GET;
        let post = Method::POST;
        for (m, p) in [
            (&get, "/"),
            (&get, "/status"),
            (&get, "/report"),
            (&get, "/proxyaddrs"),
        ] {
            assert!(
                !parse_route(m, p, None).expect(p).needs_full_access(),
                "{p}"
            );
        }
        for (m, p) in [
            (&post, "/attach/abc"),
            (&post, "/detach/abc"),
            (&get, "/interfaces/12"),
            (&get, "/interfaces/weave:expose"),
            (&post, "/expose/10.2.1.1/24"),
            (&Method::DELETE, "/expose/10.2.1.1/24"),
            (&post, "/connect"),
            (&post, "/forget"),
        ] {
            assert!(parse_route(m, p, None).expect(p).needs_full_access(), "{p}");
        }
    }

    #[test]
    fn ipam_routes() {
        let ok = |m: Method, p: &str| parse_route(&m, p, None).expect(p);
        let err = |m: Method, p: &str| parse_route(&m, p, None).expect_err(p).status().as_u16();
        let id = "5245643870f1".to_string();
        assert_eq!(
            ok(Method::POST, "/ip/5245643870f1"),
            Route::IpAllocate {
                ident: id.clone(),
                subnet: None
            }
        );
        assert_eq!(
            ok(Method::POST, "/ip/5245643870f1/10.2.3.0/24"),
            Route::IpAllocate {
                ident: id.clone(),
                subnet: Some(cidr("10.2.3.0/24"))
            }
        );
        assert_eq!(
            ok(Method::GET, "/ip/5245643870f1"),
            Route::IpLookup {
                ident: id.clone(),
                subnet: None
            }
        );
        assert_eq!(
            ok(Method::GET, "/ip/5245643870f1/10.2.3.0/24"),
            Route::IpLookup {
                ident: id.clone(),
                subnet: Some(cidr("10.2.3.0/24"))
            }
        );
        assert_eq!(
            ok(Method::PUT, "/ip/weave:expose/10.2.3.7/24"),
            Route::IpClaim {
                ident: "weave:expose".into(),
                cidr: cidr("10.2.3.7/24")
            }
        );
        assert_eq!(
            ok(Method::DELETE, "/ip/5245643870f1/10.2.3.7"),
            Route::IpFree {
                ident: id.clone(),
                addr: "10.2.3.7".parse().expect("ip")
            }
        );
        assert_eq!(
            ok(Method::DELETE, "/ip/5245643870f1"),
            Route::IpDelete { ident: id }
        );
        assert_eq!(ok(Method::GET, "/ip"), Route::IpOwned);
        assert_eq!(
            ok(Method::GET, "/ipinfo/defaultsubnet"),
            Route::IpDefaultSubnet
        );
        assert_eq!(ok(Method::GET, "/ipinfo/tracker"), Route::IpTracker);
        assert_eq!(ok(Method::GET, "/ring"), Route::Prime);
        assert_eq!(ok(Method::DELETE, "/peer"), Route::Leave);
        assert_eq!(
            ok(Method::DELETE, "/peer/host2"),
            Route::RmPeer {
                peer: "host2".into()
            }
        );
        assert_eq!(
            ok(Method::GET, "/status/ipam"),
            Route::Status(StatusView::Ipam)
        );
        // A subnet to allocate in must be a network of at least four addresses.
        assert_eq!(err(Method::POST, "/ip/abc/10.2.3.1/24"), 400);
        assert_eq!(err(Method::POST, "/ip/abc/10.2.3.0/31"), 400);
        assert_eq!(err(Method::GET, "/ip/abc/10.2.3/24"), 400);
        assert_eq!(err(Method::DELETE, "/ip/abc/nope"), 400);
        assert_eq!(err(Method::PUT, "/ip/abc"), 405);
        assert_eq!(err(Method::DELETE, "/ip/abc/10.2.3.0/24"), 405);
        assert_eq!(err(Method::POST, "/ring"), 405);
        assert_eq!(err(Method::GET, "/peer"), 405);
        assert_eq!(err(Method::GET, "/ipinfo/other"), 404);
        // Changes only on the socket; reading on both.
        for (m, p) in [
            (Method::POST, "/ip/abc"),
            (Method::PUT, "/ip/abc/10.2.3.7/24"),
            (Method::DELETE, "/ip/abc/10.2.3.7"),
            (Method::DELETE, "/ip/abc"),
            (Method::GET, "/ring"),
            (Method::DELETE, "/peer"),
            (Method::DELETE, "/peer/x"),
        ] {
            assert!(ok(m, p).needs_full_access(), "{p}");
        }
        for (m, p) in [
            (Method::GET, "/ip/abc"),
            (Method::GET, "/ip"),
            (Method::GET, "/ipinfo/defaultsubnet"),
            (Method::GET, "/status/ipam"),
        ] {
            assert!(!ok(m, p).needs_full_access(), "{p}");
        }
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%3Ab").as_deref(), Some("a:b"));
        assert_eq!(percent_decode("plain").as_deref(), Some("plain"));
        assert_eq!(percent_decode("bad%2"), None);
        assert_eq!(percent_decode("%C3%A9").as_deref(), Some("é"));
    }
}
