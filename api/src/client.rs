//! HTTP client for the router's API (shell). Used by the CLI and the proxy, so the routes and
//! their bodies are spelled in one place. Routes that only read go to the TCP address; routes
//! that change the network (attach, detach, expose, hide, connect, forget, IPAM's allocate,
//! claim, free, prime, leave and rmpeer, and `interfaces`, which enters other processes'
//! namespaces) go to the unix socket, which the router serves to root and the docker group only.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

use crate::addr::Ipv4Cidr;
use crate::types::{
    ApiError, AttachRequest, AttachResponse, DetachRequest, DetachResponse, InterfaceInfo,
};

/// Weave's default control address (read-only routes).
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:6784";
/// The router's socket for routes that change the network: root and the docker group only.
pub const DEFAULT_API_SOCKET: &str = "/var/run/weave/router.sock";

/// How long to wait for the TCP connection (the Weave script used 3 s).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the weave router at {addr}: {source}")]
    Unreachable {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("permission denied on {path}: changing the weave network needs root or membership of the docker group")]
    PermissionDenied { path: PathBuf },
    #[error("{message}")]
    Status { status: u16, message: String },
    #[error("talking to the weave router: {0}")]
    Http(#[from] hyper::Error),
    #[error("bad reply from the weave router: {0}")]
    BadReply(String),
}

impl ClientError {
    /// The HTTP status the router answered, if it answered at all.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RouterClient {
    addr: SocketAddr,
    socket: PathBuf,
}

/// Which of the router's listeners a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listener {
    /// TCP: status, report, proxy addresses; anyone on the host may read them.
    ReadOnly,
    /// The unix socket: everything, for root and the docker group.
    Socket,
}

impl RouterClient {
    /// A client for the router whose read-only API is at `addr` and whose socket is `socket`.
    pub fn new(addr: SocketAddr, socket: impl Into<PathBuf>) -> Self {
        Self {
            addr,
            socket: socket.into(),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `POST /attach/{container_id}`.
    pub async fn attach(
        &self,
        container_id: &str,
        req: &AttachRequest,
    ) -> Result<AttachResponse, ClientError> {
        self.json(Method::POST, &format!("/attach/{container_id}"), req)
            .await
    }

    /// `POST /detach/{container_id}`.
    pub async fn detach(
        &self,
        container_id: &str,
        req: &DetachRequest,
    ) -> Result<DetachResponse, ClientError> {
        self.json(Method::POST, &format!("/detach/{container_id}"), req)
            .await
    }

    /// `GET /interfaces/{pid}` or `GET /interfaces/weave:expose`; `None` when there is no weave
    /// interface there (404).
    pub async fn interfaces(&self, target: &str) -> Result<Option<InterfaceInfo>, ClientError> {
        match self
            .send(
                Listener::Socket,
                Method::GET,
                &format!("/interfaces/{target}"),
                None,
            )
            .await
        {
            Ok(body) => decode(&body).map(Some),
            Err(ClientError::Status { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `POST /expose/{ip}/{len}`: put this address on the bridge so the host reaches the subnet.
    pub async fn expose(&self, cidr: Ipv4Cidr) -> Result<(), ClientError> {
        let path = format!("/expose/{}/{}", cidr.addr, cidr.prefix_len);
        self.send(Listener::Socket, Method::POST, &path, None)
            .await
            .map(drop)
    }

    /// `DELETE /expose/{ip}/{len}`: the reverse of [`RouterClient::expose`].
    pub async fn hide(&self, cidr: Ipv4Cidr) -> Result<(), ClientError> {
        let path = format!("/expose/{}/{}", cidr.addr, cidr.prefix_len);
        self.send(Listener::Socket, Method::DELETE, &path, None)
            .await
            .map(drop)
    }

    /// `POST /ip/{ident}[/{subnet}]`: an address from IPAM (`None`: the default subnet). Waits
    /// for consensus or space (the router gives up with the reason). `Ok(None)` when the request
    /// was cancelled (with `check_alive`: the container is not running).
    pub async fn allocate(
        &self,
        ident: &str,
        subnet: Option<Ipv4Cidr>,
        check_alive: bool,
    ) -> Result<Option<Ipv4Cidr>, ClientError> {
        let mut path = format!("/ip/{ident}");
        if let Some(s) = subnet {
            path.push_str(&format!("/{}/{}", s.addr, s.prefix_len));
        }
        if check_alive {
            path.push_str("?check-alive=true");
        }
        let body = self
            .send(Listener::Socket, Method::POST, &path, None)
            .await?;
        let text = String::from_utf8_lossy(&body).trim().to_string();
        if text == "cancelled" {
            return Ok(None);
        }
        text.parse()
            .map(Some)
            .map_err(|_| ClientError::BadReply(format!("not an address: {text:?}")))
    }

    /// `PUT /ip/{ident}/{ip}/{len}`: record this exact address as `ident`'s. `Ok(false)` when
    /// cancelled.
    pub async fn claim(
        &self,
        ident: &str,
        cidr: Ipv4Cidr,
        check_alive: bool,
    ) -> Result<bool, ClientError> {
        let mut path = format!("/ip/{ident}/{}/{}", cidr.addr, cidr.prefix_len);
        if check_alive {
            path.push_str("?check-alive=true");
        }
        let body = self
            .send(Listener::Socket, Method::PUT, &path, None)
            .await?;
        Ok(String::from_utf8_lossy(&body).trim() != "cancelled")
    }

    /// `GET /ip/{ident}[/{subnet}]`: the addresses IPAM holds for `ident` (never waits).
    pub async fn lookup(
        &self,
        ident: &str,
        subnet: Option<Ipv4Cidr>,
    ) -> Result<Vec<Ipv4Cidr>, ClientError> {
        let mut path = format!("/ip/{ident}");
        if let Some(s) = subnet {
            path.push_str(&format!("/{}/{}", s.addr, s.prefix_len));
        }
        let text = self.get_text(&path).await?;
        text.split_whitespace()
            .map(|c| {
                c.parse()
                    .map_err(|_| ClientError::BadReply(format!("not an address: {c:?}")))
            })
            .collect()
    }

    /// `DELETE /ip/{ident}/{ip}`: give one address back.
    pub async fn free(&self, ident: &str, addr: std::net::Ipv4Addr) -> Result<(), ClientError> {
        self.send(
            Listener::Socket,
            Method::DELETE,
            &format!("/ip/{ident}/{addr}"),
            None,
        )
        .await
        .map(drop)
    }

    /// `GET /ring`: wait until this peer has joined the IPAM ring.
    pub async fn prime(&self) -> Result<(), ClientError> {
        self.send(Listener::Socket, Method::GET, "/ring", None)
            .await
            .map(drop)
    }

    /// `DELETE /peer`: hand this peer's address ranges to another peer (before `weave reset`).
    pub async fn leave(&self) -> Result<(), ClientError> {
        self.send(Listener::Socket, Method::DELETE, "/peer", None)
            .await
            .map(drop)
    }

    /// `DELETE /peer/{peer}`: take over a dead peer's ranges; the router's sentence
    /// (`N IPs taken over from X`).
    pub async fn rmpeer(&self, peer: &str) -> Result<String, ClientError> {
        let body = self
            .send(
                Listener::Socket,
                Method::DELETE,
                &format!("/peer/{peer}"),
                None,
            )
            .await?;
        String::from_utf8(body.to_vec()).map_err(|e| ClientError::BadReply(e.to_string()))
    }

    /// `POST /connect`: add mesh peers (`replace`: instead of the current ones). A 400 carries
    /// one line per invalid peer.
    pub async fn connect(&self, peers: &[String], replace: bool) -> Result<(), ClientError> {
        let mut form = form_encode("peer", peers);
        if replace {
            form.push_str(if form.is_empty() {
                "replace=true"
            } else {
                "&replace=true"
            });
        }
        self.send_form("/connect", form).await
    }

    /// `POST /forget`: stop redialling these peers (existing connections stay).
    pub async fn forget(&self, peers: &[String]) -> Result<(), ClientError> {
        self.send_form("/forget", form_encode("peer", peers)).await
    }

    async fn send_form(&self, path: &str, form: String) -> Result<(), ClientError> {
        self.send_with(
            Listener::Socket,
            Method::POST,
            path,
            Some((FORM, form.into_bytes())),
        )
        .await
        .map(drop)
    }

    /// `GET <path>` as text: `/status`, `/status/connections`, `/proxyaddrs`, ...
    pub async fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let body = self
            .send(Listener::ReadOnly, Method::GET, path, None)
            .await?;
        String::from_utf8(body.to_vec()).map_err(|e| ClientError::BadReply(e.to_string()))
    }

    /// `GET /report` as JSON.
    pub async fn report(&self) -> Result<serde_json::Value, ClientError> {
        let body = self
            .send(Listener::ReadOnly, Method::GET, "/report", None)
            .await?;
        decode(&body)
    }

    async fn json<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        req: &Req,
    ) -> Result<Resp, ClientError> {
        let body = serde_json::to_vec(req).map_err(|e| ClientError::BadReply(e.to_string()))?;
        let reply = self
            .send(Listener::Socket, method, path, Some(body))
            .await?;
        decode(&reply)
    }

    /// One request on a fresh connection (the API is local and rarely called, so no pool).
    /// A non-2xx answer becomes [`ClientError::Status`] carrying the router's message.
    async fn send(
        &self,
        listener: Listener,
        method: Method,
        path: &str,
        json_body: Option<Vec<u8>>,
    ) -> Result<Bytes, ClientError> {
        self.send_with(listener, method, path, json_body.map(|b| (JSON, b)))
            .await
    }

    async fn send_with(
        &self,
        listener: Listener,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<Bytes, ClientError> {
        match listener {
            Listener::ReadOnly => {
                let stream =
                    timed_connect(self.addr.to_string(), TcpStream::connect(self.addr)).await?;
                self.request(stream, method, path, body).await
            }
            Listener::Socket => {
                let stream = timed_connect(
                    self.socket.display().to_string(),
                    UnixStream::connect(&self.socket),
                )
                .await
                .map_err(|e| match e {
                    ClientError::Unreachable { source, .. }
                        if source.kind() == std::io::ErrorKind::PermissionDenied =>
                    {
                        ClientError::PermissionDenied {
                            path: self.socket.clone(),
                        }
                    }
                    other => other,
                })?;
                self.request(stream, method, path, body).await
            }
        }
    }

    async fn request<S>(
        &self,
        stream: S,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<Bytes, ClientError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "router API connection ended");
            }
        });
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, self.addr.to_string());
        let body = match body {
            Some((content_type, bytes)) => {
                builder = builder.header(http::header::CONTENT_TYPE, content_type);
                bytes
            }
            None => Vec::new(),
        };
        let request = builder
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ClientError::BadReply(e.to_string()))?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        if status.is_success() {
            return Ok(body);
        }
        Err(ClientError::Status {
            status: status.as_u16(),
            message: error_message(status, &body),
        })
    }
}

/// Connect within [`CONNECT_TIMEOUT`].
async fn timed_connect<S>(
    addr: String,
    connect: impl std::future::Future<Output = std::io::Result<S>>,
) -> Result<S, ClientError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(ClientError::Unreachable { addr, source }),
        Err(_) => Err(ClientError::Unreachable {
            addr,
            source: std::io::ErrorKind::TimedOut.into(),
        }),
    }
}

const JSON: &str = "application/json";
const FORM: &str = "application/x-www-form-urlencoded";

/// `key=v1&key=v2`, percent-encoding everything but unreserved characters.
fn form_encode(key: &str, values: &[String]) -> String {
    values
        .iter()
        .map(|v| {
            let mut enc = String::with_capacity(v.len());
            for b in v.bytes() {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    enc.push(char::from(b));
                } else {
                    enc.push_str(&format!("%{b:02X}"));
                }
            }
            format!("{key}={enc}")
        })
        .collect::<Vec<_>>()
        .join("&")
}

fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(body).map_err(|e| ClientError::BadReply(e.to_string()))
}

/// The router answers errors as `{"message": ...}`; anything else is shown as text.
fn error_message(status: StatusCode, body: &[u8]) -> String {
    if let Ok(err) = serde_json::from_slice::<ApiError>(body) {
        return err.message;
    }
    let text = String::from_utf8_lossy(body).trim().to_string();
    if text.is_empty() {
        status.to_string()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_encoding() {
        assert_eq!(
            form_encode(
                "peer",
                &["10.0.0.1".into(), "host:6783".into(), "a b".into()]
            ),
            "peer=10.0.0.1&peer=host%3A6783&peer=a%20b"
        );
        assert_eq!(form_encode("peer", &[]), "");
    }
}
