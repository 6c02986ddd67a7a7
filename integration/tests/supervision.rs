//! Supervision: a router whose data plane dies exits non-zero at once, Docker's restart policy
//! (`weave launch` sets `always`) brings up a fresh one, and traffic across hosts recovers.
//! Prints how long each step took.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use weave_integration::weave::launch_pair;
use weave_integration::{eventually, patience, Cluster, DockerClient, Host, Via};

/// One line of `docker events` about the router container: what, when (ns since the epoch),
/// and the exit code of a `die`.
#[derive(Debug)]
struct Event {
    status: String,
    at_ns: u128,
    exit_code: String,
}

/// What `docker events` prints with [`EVENT_FORMAT`], the router container's events only.
fn parse_events(text: &str) -> Vec<Event> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let status = w.next()?.to_string();
            let at_ns = w.next()?.parse().ok()?;
            (w.next()? == "weave").then(|| Event {
                status,
                at_ns,
                exit_code: w.next().unwrap_or_default().to_string(),
            })
        })
        .collect()
}

const EVENT_FORMAT: &str =
    "{{.Status}} {{.TimeNano}} {{.Actor.Attributes.name}} {{index .Actor.Attributes \"exitCode\"}}";

fn ping(h: &Host, container: &str, ip: &str) -> Result<()> {
    h.docker(["exec", container, "ping", "-c1", "-W1", ip])?
        .ok()
        .map(|_| ())
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}

fn ms(ns: u128) -> f64 {
    ns as f64 / 1e6
}

#[test]
fn router_exits_when_its_data_plane_dies_and_recovers() -> Result<()> {
    let cluster = Cluster::new(2)?;
    cluster.scenario(|c| {
        let (h1, h2) = (c.host(0), c.host(1));
        launch_pair(h1, h2, Some("s3cret"))?;
        h1.run_woven_sleeper("left", "10.36.1.1/24")?;
        h2.run_woven_sleeper("right", "10.36.1.2/24")?;
        eventually("a ping from h2's container to h1's", patience(), || {
            ping(h2, "right", "10.36.1.1")
        })?;
        let restarts_before = h1
            .docker(["inspect", "-f", "{{.RestartCount}}", "weave"])?
            .ok()?
            .stdout_trim()
            .to_string();

        let mut events = h1
            .docker_cmd(DockerClient::primary()?, Via::Dockerd)
            .args([
                "events",
                "--filter",
                "type=container",
                "--format",
                EVENT_FORMAT,
            ])
            .spawn()?;
        // `docker events` subscribes asynchronously: make sure it is listening (an event we
        // cause ourselves shows up) before the one we measure.
        eventually("docker events is listening", patience(), || {
            h1.docker(["pause", "left"])?.ok()?;
            h1.docker(["unpause", "left"])?.ok()?;
            ensure!(events.stdout().contains("unpause"), "no event yet");
            Ok(())
        })?;
        ensure!(
            parse_events(&events.stdout()).is_empty(),
            "no router event yet: {}",
            events.stdout()
        );

        // Kill the data plane: its capture interface goes.
        let killed_at = now_ns();
        let started = Instant::now();
        h1.run("ip", ["link", "del", "vethwe-pcap"])?.ok()?;

        let out = events.wait_for("the router dies and starts again", patience(), |out| {
            let evs = parse_events(out);
            evs.iter()
                .position(|e| e.status == "die" && e.at_ns >= killed_at)
                .is_some_and(|i| evs[i..].iter().any(|e| e.status == "start"))
        })?;
        let evs = parse_events(&out);
        let Some(die) = evs
            .iter()
            .find(|e| e.status == "die" && e.at_ns >= killed_at)
        else {
            bail!("no die event: {out}");
        };
        let Some(start) = evs
            .iter()
            .find(|e| e.status == "start" && e.at_ns >= die.at_ns)
        else {
            bail!("no start event after the die: {out}");
        };
        ensure!(
            die.exit_code != "0" && !die.exit_code.is_empty(),
            "the router must exit non-zero: {out}"
        );
        let logs = h1.docker(["logs", "weave"])?.ok()?.combined();
        ensure!(
            logs.contains("a part of the router ended") && logs.contains("data plane"),
            "the router says which part ended: {logs}"
        );
        let restarts_after = h1
            .docker(["inspect", "-f", "{{.RestartCount}}", "weave"])?
            .ok()?
            .stdout_trim()
            .to_string();
        ensure!(
            restarts_after != restarts_before,
            "Docker restarted the router ({restarts_before} -> {restarts_after})"
        );

        // Traffic across recovers (through the restarted router's new data plane).
        eventually("a ping across after the restart", patience(), || {
            ping(h2, "right", "10.36.1.1")
        })
        .context("traffic across after the router restarted")?;
        let recovered = started.elapsed();
        ensure!(
            h1.run("ip", ["link", "show", "vethwe-pcap"])?.success(),
            "the restarted router recreated its capture interface"
        );
        eventually("weave status ready again", patience(), || {
            h1.weave(["status"])?.ok().map(|_| ())
        })?;
        println!(
            "supervision: exit {:.0} ms after the capture went, restart {:.0} ms after the exit \
             (exit code {}), traffic across again after {:.2} s",
            ms(die.at_ns.saturating_sub(killed_at)),
            ms(start.at_ns.saturating_sub(die.at_ns)),
            die.exit_code,
            recovered.as_secs_f64()
        );
        Ok(())
    })
}
