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
//! reads the container's output). The two directions are independent: one failing (stdin to a
//! dockerd that already hung up) does not cut the other short.
//!
//! The stream's first bytes wait until the client has read the reply head (see
//! [`wait_until_head_read`]): docker-py reads the head through a buffered file and then the
//! stream from the raw socket, so whatever arrived together with the head is lost to it. An
//! exited container's `attach(logs=True)` output follows the head at once; relayed at once it
//! reached docker-py in the same read as the head, every time.

use std::os::fd::RawFd;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, Instrument};

use crate::error::raw_error_response;
use crate::head::{fix_bare_lf, response_head_end, RequestHead, MAX_HEAD};
use crate::sys::unread_output;
use crate::upstream::Upstream;

/// The client connection's socket, when it is a real one (the server puts it in each
/// request's extensions). Only used while the stream that owns the fd is alive.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientSocket(pub(crate) RawFd);

/// How long the stream's first bytes wait for the client to read the reply head. Clients read
/// the head as soon as it comes; one that does not gets the stream anyway after this.
const HEAD_READ_PATIENCE: Duration = Duration::from_secs(2);
const HEAD_READ_POLL: Duration = Duration::from_millis(1);

/// Splices the client's and dockerd's upgraded connections in a task of its own.
pub(crate) fn splice_upgraded(
    downstream: OnUpgrade,
    upstream: OnUpgrade,
    client_socket: Option<ClientSocket>,
) {
    tokio::spawn(
        async move {
            // hyper resolves the client's side once our 101 is written out.
            let (client, docker) = match tokio::try_join!(downstream, upstream) {
                Ok(pair) => pair,
                Err(e) => {
                    debug!(error = %e, "upgrade did not complete");
                    return;
                }
            };
            // Bytes dockerd sent right behind its 101 are in `docker`'s read buffer: hyper
            // hands them out first.
            splice(
                TokioIo::new(client),
                TokioIo::new(docker),
                Bytes::new(),
                client_socket,
            )
            .await;
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
    client_socket: Option<ClientSocket>,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    debug!(method = %head.method, target = %head.target, "raw hijack (no Upgrade header)");
    let mut docker = match upstream.dial().await {
        Ok(stream) => stream,
        Err(e) => {
            debug!(error = %e, "cannot reach dockerd");
            let _ = client.write_all(&raw_error_response(&e.into())).await;
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
    // Docker's reply head verbatim (bare LFs made CRLF); what came with it is stream.
    let after_head = match relay_reply_head(&mut docker, &mut client).await {
        Ok(rest) => rest,
        Err(e) => {
            debug!(error = %e, "relaying dockerd's reply head failed");
            return;
        }
    };
    splice(client, docker, after_head, client_socket).await;
}

/// Reads dockerd's reply head, writes it to the client and returns the bytes read past it.
/// Without a head we can find the end of, everything read is passed on as it is.
async fn relay_reply_head<R, W>(docker: &mut R, client: &mut W) -> std::io::Result<Bytes>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(8 * 1024);
    loop {
        if let Some(end) = response_head_end(&buf) {
            client.write_all(&fix_bare_lf(&buf[..end])).await?;
            client.flush().await?;
            return Ok(buf.split_off(end).freeze());
        }
        if buf.len() > MAX_HEAD || docker.read_buf(&mut buf).await? == 0 {
            return Ok(buf.freeze());
        }
    }
}

/// Splices both directions until both have ended; `pending` is dockerd's output already read.
async fn splice<C, D>(client: C, docker: D, pending: Bytes, client_socket: Option<ClientSocket>)
where
    C: AsyncRead + AsyncWrite,
    D: AsyncRead + AsyncWrite,
{
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut docker_read, mut docker_write) = tokio::io::split(docker);
    let to_docker = async {
        let result = tokio::io::copy(&mut client_read, &mut docker_write).await;
        // The end of stdin reaches dockerd; its output keeps coming.
        let _ = docker_write.shutdown().await;
        result
    };
    let to_client = async {
        let result =
            relay_stream(&mut docker_read, &mut client_write, pending, client_socket).await;
        // Only after the last byte: the client sees the end of the stream where dockerd ended it.
        let _ = client_write.shutdown().await;
        result
    };
    match tokio::join!(to_docker, to_client) {
        (Ok(up), Ok(down)) => debug!(to_docker = up, to_client = down, "hijacked stream ended"),
        (up, down) => debug!(?up, ?down, "hijacked stream broke"),
    }
}

/// dockerd's stream to the client: `pending` first, then whatever dockerd sends; the first
/// byte waits until the client has read the head.
async fn relay_stream<R, W>(
    docker: &mut R,
    client: &mut W,
    pending: Bytes,
    client_socket: Option<ClientSocket>,
) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut total = 0u64;
    if !pending.is_empty() {
        wait_until_head_read(client_socket).await;
        client.write_all(&pending).await?;
        client.flush().await?;
        total += pending.len() as u64;
    }
    let mut waited = total > 0;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = docker.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        if !waited {
            wait_until_head_read(client_socket).await;
            waited = true;
        }
        client.write_all(&buf[..n]).await?;
        client.flush().await?;
        total += n as u64;
    }
    Ok(total)
}

/// Waits (at most [`HEAD_READ_PATIENCE`]) until the client has read everything we wrote to it
/// so far, which is the reply head.
async fn wait_until_head_read(client_socket: Option<ClientSocket>) {
    let Some(ClientSocket(fd)) = client_socket else {
        return;
    };
    let waiting = async {
        loop {
            match unread_output(fd) {
                Ok(0) => return,
                Ok(_) => tokio::time::sleep(HEAD_READ_POLL).await,
                Err(e) => {
                    debug!(error = %e, "cannot see whether the client read the head");
                    return;
                }
            }
        }
    };
    if tokio::time::timeout(HEAD_READ_PATIENCE, waiting)
        .await
        .is_err()
    {
        debug!("the client has not read the reply head; streaming anyway");
    }
}
