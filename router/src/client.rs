//! HTTP client for the router's API (shell). Used by the CLI and the proxy, so the routes and
//! their bodies are spelled in one place.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpStream;

use crate::addr::Ipv4Cidr;
use crate::api_types::{
    ApiError, AttachRequest, AttachResponse, DetachRequest, DetachResponse, InterfaceInfo,
};

/// Weave's default control address.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:6784";

/// How long to wait for the TCP connection (the Weave script used 3 s).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the weave router at {addr}: {source}")]
    Unreachable {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
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
}

impl RouterClient {
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
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
            .send(Method::GET, &format!("/interfaces/{target}"), None)
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
        self.send(Method::POST, &path, None).await.map(drop)
    }

    /// `DELETE /expose/{ip}/{len}`: the reverse of [`RouterClient::expose`].
    pub async fn hide(&self, cidr: Ipv4Cidr) -> Result<(), ClientError> {
        let path = format!("/expose/{}/{}", cidr.addr, cidr.prefix_len);
        self.send(Method::DELETE, &path, None).await.map(drop)
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
        self.send_with(Method::POST, path, Some((FORM, form.into_bytes())))
            .await
            .map(drop)
    }

    /// `GET <path>` as text: `/status`, `/status/connections`, `/proxyaddrs`, ...
    pub async fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let body = self.send(Method::GET, path, None).await?;
        String::from_utf8(body.to_vec()).map_err(|e| ClientError::BadReply(e.to_string()))
    }

    /// `GET /report` as JSON.
    pub async fn report(&self) -> Result<serde_json::Value, ClientError> {
        let body = self.send(Method::GET, "/report", None).await?;
        decode(&body)
    }

    async fn json<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        req: &Req,
    ) -> Result<Resp, ClientError> {
        let body = serde_json::to_vec(req).map_err(|e| ClientError::BadReply(e.to_string()))?;
        let reply = self.send(method, path, Some(body)).await?;
        decode(&reply)
    }

    /// One request on a fresh connection (the API is local and rarely called, so no pool).
    /// A non-2xx answer becomes [`ClientError::Status`] carrying the router's message.
    async fn send(
        &self,
        method: Method,
        path: &str,
        json_body: Option<Vec<u8>>,
    ) -> Result<Bytes, ClientError> {
        self.send_with(method, path, json_body.map(|b| (JSON, b)))
            .await
    }

    async fn send_with(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<Bytes, ClientError> {
        let unreachable = |source| ClientError::Unreachable {
            addr: self.addr,
            source,
        };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.addr))
            .await
            .map_err(|_| unreachable(std::io::ErrorKind::TimedOut.into()))?
            .map_err(unreachable)?;
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
