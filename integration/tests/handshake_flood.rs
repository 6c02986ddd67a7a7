//! Handshake resource limits, end to end: a flood of garbage and Hello-only connections from
//! test hosts' network namespaces towards a router must neither stop two real peers from
//! connecting within seconds nor grow the router's memory without bound.
//!
//! The flood runs in threads of this test process that joined a host's netns (`setns`), so its
//! sockets use that host's address, as an attacker on the underlay would.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use weave_integration::weave::{launch, report, underlay as addr, wait_established};
use weave_integration::{eventually, patience, Cluster, Host};

const PASSWORD: &str = "fl00d-s3cret";

/// What one flood thread saw.
#[derive(Default)]
struct FloodStats {
    /// Connections opened (the listener accepted them, if only to close them).
    connects: AtomicU64,
    /// Connections the listener closed on us (refused beyond its budget, or garbage rejected).
    closed_by_listener: AtomicU64,
    /// Hello-only connections the listener answered (its header, Hello and key share): their
    /// handshake really started and is holding a slot until its deadline.
    answered: AtomicU64,
}

/// A v4 Hello frame claiming a password and the default KDF parameters, so the listener
/// accepts it, sends its share and then waits for ours, which never comes.
fn hello_only(i: u64) -> Vec<u8> {
    let mut body = vec![1u8, 1u8]; // MSG_HELLO, FLAG_ENCRYPT
    let name = (0x0a_0000_0000u64 + i).to_be_bytes();
    body.extend_from_slice(&name[2..]);
    body.extend_from_slice(&(1000 + i).to_be_bytes()); // uid
    body.extend_from_slice(&i.to_be_bytes()); // conn id
    body.extend_from_slice(&[i as u8; 32]); // nonce
    for v in [32u32 * 1024, 2, 1] {
        body.extend_from_slice(&v.to_be_bytes()); // KdfParams::DEFAULT
    }
    body.push(5);
    body.extend_from_slice(b"flood");
    let mut out = b"weave\x04\x04".to_vec();
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Keep `count` connections to `target` open from `host`'s netns until `stop`: they send a
/// Hello and go silent, or (every other one, with `garbage`) send garbage after a valid header.
/// Closed ones are reopened.
fn flood(
    host: &Host,
    target: SocketAddr,
    count: usize,
    garbage: bool,
    stop: Arc<AtomicBool>,
) -> Result<(JoinHandle<()>, Arc<FloodStats>)> {
    let netns = std::fs::File::open(format!("/run/netns/{}", host.name()))
        .with_context(|| format!("netns of {}", host.name()))?;
    let stats = Arc::new(FloodStats::default());
    let s = stats.clone();
    let handle = std::thread::spawn(move || {
        // This thread (only) now lives in the host's network namespace.
        if let Err(e) = nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET) {
            eprintln!("flood: setns failed: {e}");
            return;
        }
        let mut socks: Vec<Option<(TcpStream, bool)>> = (0..count).map(|_| None).collect();
        let mut buf = [0u8; 4096];
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            for (i, slot) in socks.iter_mut().enumerate() {
                if slot.is_none() {
                    let Ok(mut sock) = TcpStream::connect_timeout(&target, Duration::from_secs(1))
                    else {
                        continue;
                    };
                    s.connects.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                    let payload = if !garbage || i % 2 == 0 {
                        hello_only(n)
                    } else {
                        let mut g = b"weave\x04\x04".to_vec();
                        g.extend((0..64u8).map(|b| b.wrapping_mul(37).wrapping_add(n as u8)));
                        g
                    };
                    let _ = sock.write_all(&payload);
                    let _ = sock.set_nonblocking(true);
                    *slot = Some((sock, false));
                }
                let Some((sock, answered)) = slot else {
                    continue;
                };
                match sock.read(&mut buf) {
                    Ok(0) => {
                        s.closed_by_listener.fetch_add(1, Ordering::Relaxed);
                        *slot = None;
                    }
                    Ok(_) => {
                        if !*answered {
                            *answered = true;
                            s.answered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => {
                        s.closed_by_listener.fetch_add(1, Ordering::Relaxed);
                        *slot = None;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for (sock, _) in socks.into_iter().flatten() {
            let _ = sock.shutdown(Shutdown::Both);
        }
    });
    Ok((handle, stats))
}

/// One TCP connect to `target` from `host`'s netns (the underlay is not reachable from ours).
fn connect_from(host: &Host, target: SocketAddr) -> Result<()> {
    let netns = std::fs::File::open(format!("/run/netns/{}", host.name()))
        .with_context(|| format!("netns of {}", host.name()))?;
    std::thread::spawn(move || -> Result<()> {
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        TcpStream::connect_timeout(&target, Duration::from_secs(1))?;
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("connect thread panicked"))?
}

/// Resident memory of the router on `h` (the `weave` container's init process), in KiB.
fn router_rss_kib(h: &Host) -> Result<u64> {
    let pid = h
        .docker(["inspect", "-f", "{{.State.Pid}}", "weave"])?
        .ok()?
        .stdout_trim()
        .to_string();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("router pid {pid}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

#[test]
fn handshake_flood_does_not_stop_real_peers() -> Result<()> {
    let cluster = Cluster::new(3)?;
    cluster.scenario(|c| {
        let (h1, h2, h3) = (c.host(0), c.host(1), c.host(2));
        let (a1, a2) = (addr(h1)?, addr(h2)?);
        launch(h1, &["--password", PASSWORD])?;
        let target: SocketAddr = format!("{a1}:6783").parse()?;
        // The router is up and listening before we measure it.
        eventually("h1 listens", patience(), || connect_from(h3, target))?;
        let rss_before = router_rss_kib(h1)?;

        // 150 connections (Hello-only and garbage) from a third host, and 50 Hello-only ones
        // from the real peer's own address: they hold that address's inbound slots at h1 until
        // their handshake deadline, so h2's own dial to h1 is refused.
        let stop = Arc::new(AtomicBool::new(false));
        let (t3, s3) = flood(h3, target, 150, true, stop.clone())?;
        let (t2, s2) = flood(h2, target, 50, false, stop.clone())?;
        let result = (|| -> Result<()> {
            eventually(
                "the flood is on: slots held, extra connections closed",
                patience(),
                || {
                    let (answered, closed) = (
                        s3.answered.load(Ordering::Relaxed) + s2.answered.load(Ordering::Relaxed),
                        s3.closed_by_listener.load(Ordering::Relaxed)
                            + s2.closed_by_listener.load(Ordering::Relaxed),
                    );
                    ensure!(
                        answered >= 2 && closed >= 200,
                        "answered {answered}, closed {closed}"
                    );
                    Ok(())
                },
            )?;
            let mut rss_during = router_rss_kib(h1)?;

            // The real peer joins during the flood; h1 also dials it (`weave connect`), which
            // must not be held up by the inbound handshakes in progress.
            let t0 = Instant::now();
            launch(h2, &["--password", PASSWORD, &a1])?;
            h1.weave(["connect", &a2])?.ok()?;
            let line1 = wait_established(h1, &a2)?;
            let line2 = wait_established(h2, &a1)?;
            let took = t0.elapsed();
            rss_during = rss_during.max(router_rss_kib(h1)?);
            let conns = report(h1)?["Router"]["Connections"].clone();
            eprintln!(
                "handshake flood: peers established in {:.2}s under flood \
                 (h1: {line1:?}; h2: {line2:?}); h1 connections {conns}",
                took.as_secs_f64()
            );
            ensure!(
                took < Duration::from_secs(15),
                "peers took {took:?} to connect under the flood"
            );
            ensure!(
                line1.contains("encrypted") && line2.contains("encrypted"),
                "{line1} / {line2}"
            );
            // h2's dial found no inbound slot for its address: the connection is h1's dial,
            // which no inbound handshake can hold up.
            ensure!(
                line1.starts_with("->") && line2.starts_with("<-"),
                "the connection must be h1's outbound one: {line1} / {line2}"
            );
            // The flood kept going the whole time.
            let connects =
                s3.connects.load(Ordering::Relaxed) + s2.connects.load(Ordering::Relaxed);
            let closed = s3.closed_by_listener.load(Ordering::Relaxed)
                + s2.closed_by_listener.load(Ordering::Relaxed);
            eprintln!(
                "handshake flood: {connects} connections opened, {closed} closed by h1, \
                 answered {}",
                s3.answered.load(Ordering::Relaxed) + s2.answered.load(Ordering::Relaxed)
            );
            stop.store(true, Ordering::Relaxed);
            let _ = t3.join();
            let _ = t2.join();
            // Memory: bounded during the flood, and does not keep growing after it.
            let rss_after = eventually("h1 memory settles after the flood", patience(), || {
                let rss = router_rss_kib(h1)?;
                ensure!(rss <= rss_during + 4096, "rss {rss} KiB");
                Ok(rss)
            })?;
            eprintln!(
                "handshake flood: h1 router RSS before {rss_before} KiB, during {rss_during} \
                 KiB, after {rss_after} KiB"
            );
            ensure!(
                rss_during <= rss_before + 64 * 1024,
                "RSS grew from {rss_before} to {rss_during} KiB under the flood"
            );
            // Still connected after the flood.
            wait_established(h1, &a2)?;
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        result
    })
}
