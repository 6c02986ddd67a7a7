//! The demo: two simulated hosts on one LAN (network namespaces with a dockerd each), weave
//! launched on both (the second peering with the first, traffic encrypted with a password), a
//! container on each host, and a ping from one to the other over the weave network.
//!
//! Run as root: `bash integration/demo.sh`, or `WEAVE_BIN=target/release/weave target/release/demo`.
//! The password comes from `WEAVE_PASSWORD` (default: a demo password). Everything it starts is
//! removed at the end, also when a step fails.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use weave_integration::{eventually, patience, weave_bin, Cluster, Host, Out};

const DEMO_PASSWORD: &str = "weave-demo-password";

fn main() -> ExitCode {
    match demo() {
        Ok(()) => {
            println!("\ndemo: every step worked");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("\ndemo: FAILED: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one numbered step, saying what it does and how it went.
fn step<T>(n: u32, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    println!("[{n}] {what}");
    let t0 = Instant::now();
    match f() {
        Ok(value) => {
            println!("    ok ({:.1}s)", t0.elapsed().as_secs_f64());
            Ok(value)
        }
        Err(err) => {
            println!("    FAILED after {:.1}s", t0.elapsed().as_secs_f64());
            Err(err.context(format!("step {n}: {what}")))
        }
    }
}

/// Prints a command's output, indented.
fn show(out: &Out) {
    println!("    $ {}", out.cmdline);
    for line in out.stdout.lines().chain(out.stderr.lines()) {
        println!("      {line}");
    }
}

fn demo() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err(anyhow!("the demo needs root (network namespaces, dockerd)"));
    }
    let weave = weave_bin();
    if !weave.is_file() {
        return Err(anyhow!(
            "no weave binary at {}: run `cargo build --release` or set WEAVE_BIN",
            weave.display()
        ));
    }
    println!("demo: weave binary {}", weave.display());
    let (password, origin) = match std::env::var("WEAVE_PASSWORD") {
        Ok(p) if !p.is_empty() => (p, "from WEAVE_PASSWORD"),
        _ => (DEMO_PASSWORD.to_string(), "the demo's default"),
    };

    let cluster = step(
        1,
        "start two hosts (netns + dockerd each) on 192.0.2.0/24",
        || Cluster::new(2),
    )?;
    let (h1, h2) = (&cluster[0], &cluster[1]);
    let addr = |h: &Host| {
        h.underlay_addr()
            .map(|a| a.to_string())
            .ok_or_else(|| anyhow!("{} has no underlay address", h.name()))
    };
    let (addr1, addr2) = (addr(h1)?, addr(h2)?);
    println!("    {} = {addr1}, {} = {addr2}", h1.name(), h2.name());

    let result = cluster.scenario(|_| {
        step(
            2,
            &format!("weave launch on {} (password {origin})", h1.name()),
            || {
                let out = h1.weave(["launch", "--password", &password])?.ok()?;
                show(&out);
                Ok(())
            },
        )?;
        step(
            3,
            &format!("weave launch on {}, peering with {addr1}", h2.name()),
            || {
                let out = h2
                    .weave(["launch", "--password", &password, &addr1])?
                    .ok()?;
                show(&out);
                Ok(())
            },
        )?;
        for (n, host, name, cidr) in [
            (4, h1, "left", "10.35.1.1/24"),
            (5, h2, "right", "10.35.1.2/24"),
        ] {
            step(
                n,
                &format!(
                    "docker run {name} with WEAVE_CIDR={cidr} on {}",
                    host.name()
                ),
                || {
                    let env = format!("WEAVE_CIDR={cidr}");
                    let out = host
                        .docker_proxy([
                            "run", "-d", "--name", name, "-e", &env, "busybox", "sleep", "100000",
                        ])?
                        .ok()?;
                    show(&out);
                    let addr = host
                        .docker(["exec", name, "ip", "-4", "-o", "addr", "show", "ethwe"])?
                        .ok()?;
                    show(&addr);
                    Ok(())
                },
            )?;
        }
        step(
            6,
            "ping left from a second container on host 1, over weave",
            || {
                let out = h1
                    .docker_proxy([
                        "run",
                        "--rm",
                        "-e",
                        "WEAVE_CIDR=10.35.1.3/24",
                        "busybox",
                        "ping",
                        "-c1",
                        "-W2",
                        "10.35.1.1",
                    ])?
                    .ok()?;
                show(&out);
                Ok(())
            },
        )?;
        step(
            7,
            "ping left (on host 1) from right (on host 2), across hosts over the encrypted sleeve",
            || {
                let out = eventually(
                    "the ping across hosts (the mesh connects first)",
                    patience(),
                    || {
                        h2.docker(["exec", "right", "ping", "-c3", "-W1", "10.35.1.1"])?
                            .ok()
                    },
                )?;
                show(&out);
                Ok(())
            },
        )?;
        step(
            8,
            "weave status and status connections on both hosts",
            || {
                for host in [h1, h2] {
                    show(&host.weave(["status"])?.ok()?);
                    show(&host.weave(["status", "connections"])?.ok()?);
                }
                Ok(())
            },
        )
    });
    step(9, "tear everything down", || {
        drop(cluster);
        Ok(())
    })?;
    result.context("the demo failed (diagnostics of each host above)")
}
