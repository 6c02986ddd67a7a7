//! Benchmark (not a test): latency the proxy adds to a Docker API call. On one simulated host
//! with weave launched, times `GET /containers/json` straight to dockerd and through
//! /var/run/weave/weave.sock, alternating so both see the same machine load, and prints the
//! p50/p90/p99 of each and their ratio. Each request uses a fresh connection, as the docker
//! CLI does per command.
//!
//! Run as root: `WEAVE_BIN=target/release/weave target/release/bench-proxy-latency [requests]`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use weave_integration::Host;

const REQUEST: &[u8] =
    b"GET /v1.41/containers/json HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n";

fn one_request(socket: &Path, buf: &mut Vec<u8>) -> Result<Duration> {
    let start = Instant::now();
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    stream.write_all(REQUEST)?;
    buf.clear();
    stream.read_to_end(buf)?;
    let elapsed = start.elapsed();
    if !buf.starts_with(b"HTTP/1.1 200") {
        bail!(
            "unexpected reply from {}: {}",
            socket.display(),
            String::from_utf8_lossy(&buf[..buf.len().min(80)])
        );
    }
    Ok(elapsed)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn main() -> Result<()> {
    let requests: usize = match std::env::args().nth(1) {
        Some(n) => n
            .parse()
            .context("the argument is the number of requests")?,
        None => 1000,
    };
    let host = Host::new()?;
    host.weave(["launch"])?.ok()?;
    // A few containers so the listing is not trivially empty.
    for name in ["bench1", "bench2", "bench3"] {
        host.docker(["run", "-d", "--name", name, "busybox", "sleep", "100000"])?
            .ok()?;
    }
    let direct_socket = host.docker_socket();
    let proxy_socket = host.proxy_socket();
    let mut buf = Vec::with_capacity(64 * 1024);
    for _ in 0..50 {
        one_request(&direct_socket, &mut buf)?;
        one_request(&proxy_socket, &mut buf)?;
    }
    let (mut direct, mut proxied) = (Vec::new(), Vec::new());
    for _ in 0..requests {
        direct.push(one_request(&direct_socket, &mut buf)?);
        proxied.push(one_request(&proxy_socket, &mut buf)?);
    }
    direct.sort();
    proxied.sort();
    println!("GET /containers/json, {requests} requests each, fresh connection per request");
    for (label, samples) in [
        ("direct to dockerd", &direct),
        ("through the proxy", &proxied),
    ] {
        println!(
            "{label:>18}: p50 {:>8.3} ms  p90 {:>8.3} ms  p99 {:>8.3} ms",
            percentile(samples, 0.5).as_secs_f64() * 1e3,
            percentile(samples, 0.9).as_secs_f64() * 1e3,
            percentile(samples, 0.99).as_secs_f64() * 1e3,
        );
    }
    let ratio = |p| percentile(&proxied, p).as_secs_f64() / percentile(&direct, p).as_secs_f64();
    println!(
        "proxy/direct ratio: p50 {:.2}x  p90 {:.2}x  p99 {:.2}x",
        ratio(0.5),
        ratio(0.9),
        ratio(0.99)
    );
    Ok(())
}
