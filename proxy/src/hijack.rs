//! Hijacked streams (shell): attach, exec start and BuildKit sessions, where HTTP gives way to
//! raw bytes in both directions (spec §1.6.4).
//!
//! - [`splice_upgraded`]: the client asked to upgrade (`Upgrade: tcp`, `h2c`) and dockerd said
//!   101; once hyper has written our 101, both upgraded connections are spliced.
//! - [`raw_hijack`]: an attach / exec start without `Upgrade` (old clients), which Docker
//!   answers with `200 OK` and then takes over. hyper cannot follow that, so the server routes
//!   such a connection here before hyper sees it, and we relay it byte for byte.
//!
//! Both splice with half-close: when one side ends its output, the other side's write half is
//! shut down while the other direction keeps flowing (`docker attach` closes stdin and still
//! reads the container's output).

use bytes::{Bytes, BytesMut};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, Instrument};

use crate::error::raw_error_response;
use crate::head::{fix_bare_lf, response_head_end, RequestHead, MAX_HEAD};
use crate::upstream::Upstream;

/// Splices the client's and dockerd's upgraded connections in a task of its own.
pub(crate) fn splice_upgraded(downstream: OnUpgrade, upstream: OnUpgrade) {
    tokio::spawn(
        async move {
            let (client, docker) = match tokio::try_join!(downstream, upstream) {
                Ok(pair) => pair,
                Err(e) => {
                    debug!(error = %e, "upgrade did not complete");
                    return;
                }
            };
            let mut client = TokioIo::new(client);
            let mut docker = TokioIo::new(docker);
            match tokio::io::copy_bidirectional(&mut client, &mut docker).await {
                Ok((up, down)) => debug!(to_docker = up, to_client = down, "hijacked stream ended"),
                Err(e) => debug!(error = %e, "hijacked stream broke"),
            }
        }
        .in_current_span(),
    );
}

/// Relays one raw-hijacked request: `head` is the request head the server peeked, `buffered`
/// everything read from the client so far (head included).
pub(crate) async fn raw_hijack<C>(
    mut client: C,
    head: RequestHead,
    buffered: Bytes,
    upstream: &Upstream,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    debug!(method = %head.method, target = %head.target, "raw hijack (no Upgrade header)");
    let mut docker = match upstream.dial().await {
        Ok(stream) => stream,
        Err(e) => {
            debug!(error = %e, "cannot reach dockerd");
            let _ = client.write_all(&raw_error_response(&e)).await;
            let _ = client.shutdown().await;
            return;
        }
    };
    let mut first = head.encode_for_upstream();
    first.extend_from_slice(buffered.get(head.len..).unwrap_or_default());
    if let Err(e) = docker.write_all(&first).await {
        debug!(error = %e, "writing the request to dockerd failed");
        return;
    }

    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut docker_read, mut docker_write) = tokio::io::split(docker);
    let to_docker = async {
        let result = tokio::io::copy(&mut client_read, &mut docker_write).await;
        let _ = docker_write.shutdown().await;
        result
    };
    let to_client = async {
        let result = relay_reply(&mut docker_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
        result
    };
    let (up, down) = tokio::join!(to_docker, to_client);
    match (up, down) {
        (Ok(up), Ok(down)) => debug!(to_docker = up, to_client = down, "raw stream ended"),
        (up, down) => debug!(?up, ?down, "raw stream broke"),
    }
}

/// Docker's reply head verbatim (bare LFs made CRLF), then every byte that follows.
async fn relay_reply<R, W>(docker: &mut R, client: &mut W) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(8 * 1024);
    loop {
        if let Some(end) = response_head_end(&buf) {
            client.write_all(&fix_bare_lf(&buf[..end])).await?;
            client.write_all(&buf[end..]).await?;
            break;
        }
        if buf.len() > MAX_HEAD || docker.read_buf(&mut buf).await? == 0 {
            // Not a head we can find the end of: pass it on as it is.
            client.write_all(&buf).await?;
            break;
        }
    }
    client.flush().await?;
    let rest = tokio::io::copy(docker, client).await?;
    Ok(buf.len() as u64 + rest)
}
