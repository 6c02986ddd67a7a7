//! The way to dockerd (shell): one fresh connection per proxied request (spec §1.4), closed
//! when the reply ends or turned into the tunnel when the request is hijacked.

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tracing::{debug, Instrument};

use crate::body::ProxyBody;

const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What can go wrong on the way to dockerd.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("invalid Docker host {0:?}: expected unix:///path, /path or tcp://host:port")]
    BadDockerHost(String),
    /// dockerd's socket could not be dialled (spec §1.6.2). The text starts like the Go proxy's
    /// and goes on like the docker CLI's own message.
    #[error(
        "Could not connect to target: Cannot connect to the Docker daemon at {target}. \
         Is the docker daemon running? ({source})"
    )]
    Connect {
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("Could not make request to target: {0}")]
    Exchange(#[source] hyper::Error),
}

/// Where dockerd listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    Unix(PathBuf),
    /// `host:port`, plain TCP (the proxy never speaks TLS upstream, spec §1.3).
    Tcp(String),
}

impl Upstream {
    /// `unix:///path`, `/path`, `tcp://host:port` or a bare `host:port`.
    pub fn parse(host: &str) -> Result<Self, UpstreamError> {
        let bad = || UpstreamError::BadDockerHost(host.to_string());
        if let Some(path) = host.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(bad());
            }
            return Ok(Upstream::Unix(PathBuf::from(path)));
        }
        if host.starts_with('/') {
            return Ok(Upstream::Unix(PathBuf::from(host)));
        }
        let addr = host.strip_prefix("tcp://").unwrap_or(host);
        let addr = addr.trim_end_matches('/');
        if addr.contains("://")
            || addr.rsplit_once(':').is_none_or(|(h, p)| {
                h.is_empty() || p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit())
            })
        {
            return Err(bad());
        }
        Ok(Upstream::Tcp(addr.to_string()))
    }

    /// The address in `DOCKER_HOST` form, for messages and for bollard.
    pub fn url(&self) -> String {
        match self {
            Upstream::Unix(path) => format!("unix://{}", path.display()),
            Upstream::Tcp(addr) => format!("tcp://{addr}"),
        }
    }

    /// Opens a new connection to dockerd.
    pub(crate) async fn dial(&self) -> Result<UpstreamStream, UpstreamError> {
        let connect_error = |source| UpstreamError::Connect {
            target: self.url(),
            source,
        };
        match self {
            Upstream::Unix(path) => UnixStream::connect(path)
                .await
                .map(UpstreamStream::Unix)
                .map_err(connect_error),
            Upstream::Tcp(addr) => {
                let stream = tokio::time::timeout(TCP_CONNECT_TIMEOUT, TcpStream::connect(addr))
                    .await
                    .map_err(|_| connect_error(io::ErrorKind::TimedOut.into()))?
                    .map_err(connect_error)?;
                // Docker API traffic is small request/reply exchanges and interactive streams.
                let _ = stream.set_nodelay(true);
                Ok(UpstreamStream::Tcp(stream))
            }
        }
    }

    /// Sends one request on a new connection and returns Docker's reply head with its body
    /// still streaming. The connection runs with upgrades on, so a 101 can be taken over with
    /// `hyper::upgrade::on`.
    pub(crate) async fn send(
        &self,
        request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let stream = self.dial().await?;
        let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
            .preserve_header_case(true)
            .title_case_headers(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(UpstreamError::Exchange)?;
        tokio::spawn(
            async move {
                if let Err(e) = connection.with_upgrades().await {
                    debug!(error = %e, "upstream connection ended with an error");
                }
            }
            .in_current_span(),
        );
        sender
            .send_request(request)
            .await
            .map_err(UpstreamError::Exchange)
    }
}

/// A connection to dockerd, whichever transport.
#[derive(Debug)]
pub(crate) enum UpstreamStream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamStream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Unix(s) => s.is_write_vectored(),
            UpstreamStream::Tcp(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Unix(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    /// `shutdown(SHUT_WR)`: dockerd sees the end of stdin while its output keeps flowing.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_hosts() {
        let unix = |p: &str| Upstream::Unix(PathBuf::from(p));
        assert_eq!(
            Upstream::parse("unix:///var/run/docker.sock").ok(),
            Some(unix("/var/run/docker.sock"))
        );
        assert_eq!(
            Upstream::parse("/run/docker.sock").ok(),
            Some(unix("/run/docker.sock"))
        );
        assert_eq!(
            Upstream::parse("tcp://127.0.0.1:2375").ok(),
            Some(Upstream::Tcp("127.0.0.1:2375".into()))
        );
        assert_eq!(
            Upstream::parse("docker.example:2375").ok(),
            Some(Upstream::Tcp("docker.example:2375".into()))
        );
        for bad in [
            "",
            "unix://relative",
            "ssh://host",
            "tcp://host",
            "npipe:////./pipe/x",
            "host:",
        ] {
            assert!(Upstream::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            Upstream::parse("unix:///var/run/docker.sock")
                .map(|u| u.url())
                .ok(),
            Some("unix:///var/run/docker.sock".to_string())
        );
    }
}
