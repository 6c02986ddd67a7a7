//! The listening side (shell): accept on the proxy's unix socket, one task and one tracing span
//! per connection, and per connection a choice between hyper and the raw hijack path, made on
//! the first request head (see [`crate::head`]).
//!
//! Every reply closes its connection (see [`crate::forward::downstream`]), so each request is
//! the first of its connection and gets that choice.

use std::convert::Infallible;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::UnixListener;
use tracing::{debug, warn, Instrument};

use crate::head::{parse_request_head, HeadParse};
use crate::hijack::{raw_hijack, ClientSocket};
use crate::intercept::handle;
use crate::prefixed::Prefixed;
use crate::proxy::Proxy;

/// How long a new connection may take to send its first request head.
const FIRST_HEAD_TIMEOUT: Duration = Duration::from_secs(60);

/// Accepts connections until `shutdown` resolves. Connections already accepted carry on.
pub(crate) async fn serve(
    listener: UnixListener,
    proxy: Arc<Proxy>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut next_id: u64 = 0;
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    next_id += 1;
                    let span = tracing::info_span!("conn", id = next_id);
                    // The stream owns the fd for as long as anything that uses it runs.
                    let socket = ClientSocket(stream.as_raw_fd());
                    tokio::spawn(
                        serve_connection(stream, Some(socket), proxy.clone()).instrument(span),
                    );
                }
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Serves one client connection; `socket` is its fd when `stream` is a real socket.
pub(crate) async fn serve_connection<S>(
    mut stream: S,
    socket: Option<ClientSocket>,
    proxy: Arc<Proxy>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let head = loop {
        match parse_request_head(&buf) {
            HeadParse::Complete(head) => break Some(head),
            HeadParse::Invalid => break None,
            HeadParse::Partial => {}
        }
        match tokio::time::timeout(FIRST_HEAD_TIMEOUT, stream.read_buf(&mut buf)).await {
            Ok(Ok(0)) if buf.is_empty() => return,
            // Half a head and EOF: hyper answers that.
            Ok(Ok(0)) => break None,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                debug!(error = %e, "reading the first request failed");
                return;
            }
            Err(_) => {
                debug!("no request within {FIRST_HEAD_TIMEOUT:?}; closing");
                return;
            }
        }
    };
    let buffered = buf.freeze();
    if let Some(head) = head.filter(|head| head.wants_raw_hijack()) {
        raw_hijack(stream, head, buffered, &proxy.upstream, socket).await;
        return;
    }

    let io = TokioIo::new(Prefixed::new(buffered, stream));
    let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        if let Some(socket) = socket {
            req.extensions_mut().insert(socket);
        }
        let proxy = proxy.clone();
        async move { Ok::<_, Infallible>(handle(proxy, req).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .preserve_header_case(true)
        .title_case_headers(true)
        .half_close(true)
        // Docker's replies carry their own Date; ours (errors) need none.
        .auto_date_header(false)
        .serve_connection(io, service)
        .with_upgrades();
    if let Err(e) = connection.await {
        // Typically a client that went away mid-stream.
        debug!(error = %e, "connection ended with an error");
    }
}
