//! The mesh between hosts: `weave launch [--password P] <peers>` connects the routers over TCP
//! 6783 on the underlay, with encryption, discovery, `weave connect` and `weave forget`, all seen
//! through `weave status`.
//!
//! Container traffic crosses hosts over the sleeve (UDP 6783, encrypted with the password):
//! plain `docker run` through each host's proxy, as a user would.

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use weave_integration::weave::{
    launch, launch_pair, launch_pair_with, peer_name, report, status, underlay as addr,
    wait_established,
};
use weave_integration::{eventually, never, patience, quiet_period, Cluster, GiveUp, Host};

/// `weave status`.
fn summary(h: &Host) -> Result<String> {
    Ok(h.weave(["status"])?.ok()?.stdout)
}

/// The report's `Router.Connections` entry about `ip`.
fn report_connection(h: &Host, ip: &str) -> Result<Value> {
    let report = report(h)?;
    let prefix = format!("{ip}:");
    report["Router"]["Connections"]
        .as_array()
        .and_then(|conns| {
            conns.iter().find(|c| {
                c["Address"]
                    .as_str()
                    .is_some_and(|a| a.starts_with(&prefix))
            })
        })
        .cloned()
        .with_context(|| format!("no connection with {ip} in the report: {report:#}"))
}

/// What Weave's tests grep for (`encrypted *sleeve`): the word, blanks, the overlay name.
fn says_encrypted_sleeve(line: &str) -> bool {
    line.match_indices("encrypted").any(|(i, w)| {
        let rest = &line[i + w.len()..];
        let trimmed = rest.trim_start_matches(' ');
        trimmed.len() < rest.len() && trimmed.starts_with("sleeve")
    })
}

/// The `weave status connections` line about `ip` (either direction), if any.
fn connection_to(h: &Host, ip: &str) -> Result<Option<String>> {
    let text = status(h, "connections")?;
    let needle = format!(" {ip}:");
    Ok(text
        .lines()
        .find(|l| l.contains(&needle))
        .map(str::to_string))
}

#[test]
fn two_hosts_connect_encrypted() -> Result<()> {
    let cluster = Cluster::new(2)?;
    cluster.scenario(|c| {
        let (h1, h2) = (c.host(0), c.host(1));
        let (a1, a2) = (addr(h1)?, addr(h2)?);
        launch(h1, &["--password", "s3cret"])?;
        launch(h2, &["--password", "s3cret", &a1])?;
        for (h, other) in [(h1, &a2), (h2, &a1)] {
            let line = wait_established(h, other)?;
            ensure!(
                line.contains("encrypted") && !line.contains("unencrypted"),
                "the connection must be encrypted: {line}"
            );
            ensure!(says_encrypted_sleeve(&line), "encrypted *sleeve: {line}");
            // The sleeve's attributes: UDP encrypted, and the forwarder's effective MTU.
            ensure!(
                line.contains(" encrypted=true mtu="),
                "attributes encrypted=true mtu=N: {line}"
            );
            let conn = report_connection(h, other)?;
            ensure!(
                conn["Attrs"]["encrypted"] == true && conn["Attrs"]["mtu"].is_u64(),
                "report attributes: {conn}"
            );
            let router = &report(h)?["Router"];
            ensure!(
                router["Interface"] == "vethwe-pcap (via pcap)",
                "capture interface: {}",
                router["Interface"]
            );
            ensure!(
                router["CaptureStats"]["PacketsReceived"].is_u64(),
                "capture stats: {}",
                router["CaptureStats"]
            );
        }
        let (n1, n2) = (peer_name(h1)?, peer_name(h2)?);
        ensure!(n1 != n2, "peer names must differ: {n1}");
        for h in [h1, h2] {
            eventually("both peers listed", patience(), || {
                let peers = status(h, "peers")?;
                let top: Vec<&str> = peers.lines().filter(|l| !l.starts_with(' ')).collect();
                ensure!(top.len() == 2, "two peers expected:\n{peers}");
                for n in [&n1, &n2] {
                    ensure!(
                        top.iter().any(|l| l.starts_with(n.as_str())),
                        "{n} missing:\n{peers}"
                    );
                }
                ensure!(
                    peers.lines().filter(|l| l.ends_with("established")).count() == 2,
                    "each peer lists its established connection:\n{peers}"
                );
                Ok(())
            })?;
            let summary = summary(h)?;
            ensure!(
                summary.contains("Encryption: enabled"),
                "encryption on:\n{summary}"
            );
            ensure!(
                summary.contains("Connections: 1 (1 established)"),
                "one connection:\n{summary}"
            );
        }
        // Shown with --nocapture (and on failure).
        eprintln!(
            "{}{}{}",
            summary(h2)?,
            status(h2, "connections")?,
            status(h2, "peers")?
        );
        ensure!(
            status(h2, "targets")?.trim() == a1,
            "h2 targets h1: {}",
            status(h2, "targets")?
        );
        Ok(())
    })
}

#[test]
fn wrong_password_is_refused_with_its_reason() -> Result<()> {
    let cluster = Cluster::new(2)?;
    cluster.scenario(|c| {
        let (h1, h2) = (c.host(0), c.host(1));
        let (a1, a2) = (addr(h1)?, addr(h2)?);
        launch(h1, &["--password", "s3cret"])?;
        launch(h2, &["--password", "wrong", &a1])?;
        let line = eventually("h2 reports the password mismatch", patience(), || {
            let line = connection_to(h2, &a1)?.context("no line for h1 yet")?;
            ensure!(line.contains("password"), "no password reason yet: {line}");
            Ok(line)
        })?;
        ensure!(
            line.contains("failed") || line.contains("retrying"),
            "{line}"
        );
        // A few more attempts never get through. Each look must see h2 still trying (its
        // line for h1), or it would prove nothing.
        never(
            "a connection between h1 and h2 despite the wrong password",
            quiet_period(),
            || {
                let trying = connection_to(h2, &a1)?.context("h2 no longer lists h1")?;
                for line in [Some(trying), connection_to(h1, &a2)?]
                    .into_iter()
                    .flatten()
                {
                    if line.contains("established") {
                        return Ok(Some(line));
                    }
                }
                Ok(None)
            },
        )?;
        let logs = h1.docker(["logs", "weave"])?.ok()?.combined();
        ensure!(
            logs.contains("password mismatch"),
            "h1 logs the reason too:\n{logs}"
        );
        Ok(())
    })
}

#[test]
fn third_host_discovers_the_first() -> Result<()> {
    let cluster = Cluster::new(3)?;
    cluster.scenario(|c| {
        let (h1, h2, h3) = (c.host(0), c.host(1), c.host(2));
        let (a1, a2, a3) = (addr(h1)?, addr(h2)?, addr(h3)?);
        launch(h1, &[])?;
        launch(h2, &[&a1])?;
        launch(h3, &[&a2])?;
        wait_established(h3, &a2)?;
        wait_established(h3, &a1)?;
        wait_established(h1, &a3)?;
        eventually("h3 knows three peers", patience(), || {
            let peers = status(h3, "peers")?;
            let top = peers.lines().filter(|l| !l.starts_with(' ')).count();
            ensure!(top == 3, "three peers expected:\n{peers}");
            Ok(())
        })?;
        let summary = summary(h3)?;
        ensure!(
            summary.contains("Encryption: disabled"),
            "no password:\n{summary}"
        );
        Ok(())
    })
}

#[test]
fn connect_and_forget_change_targets() -> Result<()> {
    let cluster = Cluster::new(2)?;
    cluster.scenario(|c| {
        let (h1, h2) = (c.host(0), c.host(1));
        let (a1, a2) = (addr(h1)?, addr(h2)?);
        launch(h1, &[])?;
        launch(h2, &[])?;
        ensure!(status(h1, "targets")?.is_empty(), "no targets at first");
        h1.weave(["connect", &a2])?.ok()?;
        ensure!(status(h1, "targets")? == format!("{a2}\n"), "target added");
        wait_established(h1, &a2)?;
        wait_established(h2, &a1)?;
        let bad = h1.weave(["connect", "bad host"])?.fail()?;
        ensure!(
            bad.combined().contains("invalid peer name"),
            "bad peer refused: {bad}"
        );
        h1.weave(["connect", "--replace", "192.0.2.250:7000"])?
            .ok()?;
        ensure!(
            status(h1, "targets")? == "192.0.2.250:7000\n",
            "replaced: {}",
            status(h1, "targets")?
        );
        h1.weave(["forget", "192.0.2.250:7000"])?.ok()?;
        ensure!(status(h1, "targets")?.is_empty(), "forgotten");
        // Forget does not close connections.
        wait_established(h1, &a2)?;
        Ok(())
    })
}

/// Two hosts, a container on each through the proxy; the one on h2 pings the one on h1.
fn containers_talk_across(password: Option<&str>) -> Result<()> {
    let cluster = Cluster::new(2)?;
    cluster.scenario(|c| {
        let (h1, h2) = (c.host(0), c.host(1));
        launch_pair(h1, h2, password)?;
        h1.run_woven_sleeper("left", "10.35.1.1/24")?;
        h2.run_woven_sleeper("right", "10.35.1.2/24")?;
        eventually("a ping from h2's container to h1's", patience(), || {
            h2.docker(["exec", "right", "ping", "-c1", "-W1", "10.35.1.1"])?
                .ok()
        })?;
        // Bigger than the bridge MTU: fragmented by the container's stack, every piece crosses.
        h2.docker([
            "exec",
            "right",
            "ping",
            "-c1",
            "-W2",
            "-s",
            "8000",
            "10.35.1.1",
        ])?
        .ok()
        .context("ping -s 8000 across hosts")?;
        // TCP across, with busybox nc.
        h1.docker([
            "exec",
            "-d",
            "left",
            "sh",
            "-c",
            "echo over-tcp | nc -l -p 4422",
        ])?
        .ok()?;
        let got = eventually("nc across hosts", patience(), || {
            let out = h2
                .docker(["exec", "right", "nc", "-w", "2", "10.35.1.1", "4422"])?
                .ok()?;
            ensure!(out.stdout.contains("over-tcp"), "{out}");
            Ok(out)
        })?;
        ensure!(got.stdout.contains("over-tcp"));
        Ok(())
    })
}

#[test]
fn containers_on_two_hosts_talk_encrypted() -> Result<()> {
    containers_talk_across(Some("s3cret"))
}

#[test]
fn containers_on_two_hosts_talk_unencrypted() -> Result<()> {
    containers_talk_across(None)
}

/// `--trusted-subnets`: between two peers that trust each other's address, UDP goes in plaintext
/// (TCP stays encrypted) and containers still talk; a third peer that trusts nobody gets
/// encrypted UDP with both, though they trust it.
#[test]
fn trusted_subnets_leave_udp_unencrypted() -> Result<()> {
    let cluster = Cluster::new(3)?;
    cluster.scenario(|c| {
        let (h1, h2, h3) = (c.host(0), c.host(1), c.host(2));
        let (a1, a2, a3) = (addr(h1)?, addr(h2)?, addr(h3)?);
        launch_pair_with(
            h1,
            h2,
            &["--password", "s3cret", "--trusted-subnets", "192.0.2.0/24"],
        )?;
        for (h, other) in [(h1, &a2), (h2, &a1)] {
            let line = wait_established(h, other)?;
            ensure!(
                line.contains(" unencrypted sleeve ") && line.contains(" encrypted=false mtu="),
                "trusted both ways: plaintext UDP: {line}"
            );
            let conn = report_connection(h, other)?;
            ensure!(conn["Attrs"]["encrypted"] == false, "report: {conn}");
            let summary = summary(h)?;
            ensure!(
                summary.contains(" TrustedSubnets: 192.0.2.0/24\n")
                    && summary.contains(" Encryption: enabled\n"),
                "{summary}"
            );
            ensure!(
                report(h)?["Router"]["TrustedSubnets"] == serde_json::json!(["192.0.2.0/24"]),
                "report TrustedSubnets"
            );
        }
        // The data path works in plaintext both ways.
        for (h, name, cidr) in [
            (h1, "trust-left", "10.35.1.1/24"),
            (h2, "trust-right", "10.35.1.2/24"),
        ] {
            h.run_woven_sleeper(name, cidr)?;
        }
        eventually(
            "a ping between the trusting hosts' containers",
            patience(),
            || {
                h2.docker(["exec", "trust-right", "ping", "-c1", "-W1", "10.35.1.1"])?
                    .ok()
            },
        )?;
        // h3 trusts nobody: encrypted UDP with both (it discovers h2 through h1).
        launch(h3, &["--password", "s3cret", &a1])?;
        for (h, other) in [(h3, &a1), (h3, &a2), (h1, &a3), (h2, &a3)] {
            let line = wait_established(h, other)?;
            ensure!(
                says_encrypted_sleeve(&line)
                    && !line.contains("unencrypted")
                    && line.contains(" encrypted=true mtu="),
                "trusted one way only: encrypted UDP: {line}"
            );
        }
        ensure!(
            summary(h3)?.contains(" TrustedSubnets: none\n"),
            "h3 trusts nobody"
        );
        Ok(())
    })
}

/// A bad CIDR in `--trusted-subnets` fails `weave launch` before anything starts.
#[test]
fn launch_refuses_a_bad_trusted_subnet() -> Result<()> {
    let cluster = Cluster::new(1)?;
    cluster.scenario(|c| {
        let h = c.host(0);
        let out = h
            .weave(["launch", "--trusted-subnets", "10.0.0.0/8,10.1.0.0/40"])?
            .fail()?;
        ensure!(
            out.combined().contains("invalid CIDR \"10.1.0.0/40\""),
            "the bad CIDR named: {out}"
        );
        let ps = h.docker(["ps", "-a", "--format", "{{.Names}}"])?.ok()?;
        ensure!(
            !ps.stdout.lines().any(|n| n == "weave"),
            "no router container: {ps}"
        );
        Ok(())
    })
}

/// `--no-discovery`: h3, given only h2, never dials h1 (nor h1 h3), though gossip still tells
/// everyone about everyone.
#[test]
fn no_discovery_dials_only_the_peers_given() -> Result<()> {
    let cluster = Cluster::new(3)?;
    cluster.scenario(|c| {
        let (h1, h2, h3) = (c.host(0), c.host(1), c.host(2));
        let (a1, a2, a3) = (addr(h1)?, addr(h2)?, addr(h3)?);
        launch(h1, &["--no-discovery"])?;
        launch(h2, &["--no-discovery", &a1])?;
        launch(h3, &["--no-discovery", &a2])?;
        wait_established(h2, &a1)?;
        wait_established(h3, &a2)?;
        for h in [h1, h3] {
            eventually("three peers known through gossip", patience(), || {
                let peers = status(h, "peers")?;
                let top = peers.lines().filter(|l| !l.starts_with(' ')).count();
                ensure!(top == 3, "three peers expected:\n{peers}");
                Ok(())
            })?;
        }
        // Discovery would dial at once (it acts on the first topology update). Each look
        // must see the connections that are there (h3 to h2), or it would prove nothing.
        never(
            "h1 and h3 connecting without discovery",
            quiet_period(),
            || {
                let h3_conns = status(h3, "connections")?;
                ensure!(
                    h3_conns.contains(&format!(" {a2}:")),
                    "h3's connections do not list h2:\n{h3_conns}"
                );
                if connection_to(h3, &a1)?.is_some() {
                    return Ok(Some(format!("h3 -> h1:\n{h3_conns}")));
                }
                if connection_to(h1, &a3)?.is_some() {
                    return Ok(Some(format!("h1 -> h3:\n{}", status(h1, "connections")?)));
                }
                Ok(None)
            },
        )?;
        for h in [h1, h2, h3] {
            let summary = summary(h)?;
            ensure!(
                summary.contains(" PeerDiscovery: disabled\n"),
                "discovery off:\n{summary}"
            );
            ensure!(
                report(h)?["Router"]["PeerDiscovery"] == false,
                "report PeerDiscovery"
            );
        }
        ensure!(
            summary(h3)?.contains(" Connections: 1 (1 established)\n"),
            "h3 has just its connection to h2:\n{}",
            summary(h3)?
        );
        Ok(())
    })
}

/// `--conn-limit 1` on h1: h2 and h3 both dial it, and exactly one of them gets in (whichever
/// handshake completes first); h1 refuses the other, retry after retry, and logs why.
#[test]
fn conn_limit_refuses_connections_beyond_the_limit() -> Result<()> {
    let cluster = Cluster::new(3)?;
    cluster.scenario(|c| {
        let (h1, h2, h3) = (c.host(0), c.host(1), c.host(2));
        let (a1, a2, a3) = (addr(h1)?, addr(h2)?, addr(h3)?);
        launch(h1, &["--conn-limit", "1"])?;
        launch(h2, &[&a1])?;
        launch(h3, &[&a1])?;
        // Either may win the race.
        let (winner, loser, a_winner, a_loser) =
            eventually("one of h2 and h3 established with h1", patience(), || {
                let two = connection_to(h2, &a1)?.is_some_and(|l| l.contains("established"));
                let three = connection_to(h3, &a1)?.is_some_and(|l| l.contains("established"));
                match (two, three) {
                    (true, false) => Ok((h2, h3, &a2, &a3)),
                    (false, true) => Ok((h3, h2, &a3, &a2)),
                    (true, true) => Err(GiveUp(format!(
                        "both got in past a limit of 1:\n{}",
                        status(h1, "connections")?
                    ))
                    .into()),
                    (false, false) => anyhow::bail!("neither yet"),
                }
            })?;
        wait_established(h1, a_winner)?;
        // h1 logs the refusal, naming the loser's address; and the loser keeps retrying.
        let refusals = |logs: &str| {
            logs.lines()
                .filter(|l| {
                    l.contains("Connection limit reached (1)") && l.contains(&format!("{a_loser}:"))
                })
                .count()
        };
        eventually("h1 refuses the loser twice", patience(), || {
            let logs = h1.docker(["logs", "weave"])?.ok()?.combined();
            // Meanwhile, at every look (else fail at once): one connection on h1, none
            // established on the loser.
            let text = status(h1, "connections")?;
            let lines: Vec<&str> = text.lines().collect();
            if !(lines.len() == 1
                && lines[0].contains(&format!(" {a_winner}:"))
                && lines[0].contains("established"))
            {
                return Err(GiveUp(format!(
                    "h1 must have just its connection with {a_winner}:\n{text}"
                ))
                .into());
            }
            let line = connection_to(loser, &a1)?;
            if line.as_ref().is_none_or(|l| l.contains("established")) {
                return Err(GiveUp(format!(
                    "{} must still try h1 and never get in: {line:?}",
                    loser.name()
                ))
                .into());
            }
            let n = refusals(&logs);
            ensure!(n >= 2, "{n} refusal(s) of {a_loser} in h1's logs:\n{logs}");
            Ok(())
        })?;
        // The loser sees h1 hang up after the handshake, and says so.
        eventually(
            &format!("{} shows h1 hanging up", loser.name()),
            patience(),
            || {
                let line = connection_to(loser, &a1)?.context("no line for h1")?;
                ensure!(
                    !line.contains("established")
                        && line.contains("connection closed by the remote"),
                    "{line}"
                );
                Ok(())
            },
        )?;
        ensure!(
            connection_to(winner, &a1)?.is_some_and(|l| l.contains("established")),
            "{} keeps its connection with h1: {}",
            winner.name(),
            status(winner, "connections")?
        );
        let summary = summary(h1)?;
        ensure!(
            summary.contains(" Connections: 1 (1 established)\n"),
            "h1 at its limit:\n{summary}"
        );
        Ok(())
    })
}

#[test]
fn connections_stay_pending_while_udp_is_blocked() -> Result<()> {
    // TCP 6783 works but the sleeve's UDP does not: the connection must show `pending`, as in
    // Weave, until heartbeats get through both ways; then it becomes established.
    let cluster = Cluster::new(2)?;
    cluster.scenario(|c| {
        let (h1, h2) = (c.host(0), c.host(1));
        let (a1, a2) = (addr(h1)?, addr(h2)?);
        let block = ["INPUT", "-p", "udp", "--dport", "6783", "-j", "DROP"];
        for h in [h1, h2] {
            h.run("iptables", ["-I"].iter().chain(&block))?.ok()?;
        }
        launch(h1, &[])?;
        launch(h2, &[&a1])?;
        eventually(
            "h2's connection to h1 is up and pending",
            patience(),
            || {
                let line = connection_to(h2, &a1)?.context("no connection yet")?;
                ensure!(line.contains(" pending "), "{line}");
                Ok(())
            },
        )?;
        // Each look must see the connection listed (the probe ran), never established.
        never(
            "a connection without UDP counted as established",
            quiet_period(),
            || {
                for (h, ip) in [(h1, &a2), (h2, &a1)] {
                    let text = status(h, "connections")?;
                    ensure!(
                        text.contains(ip.as_str()),
                        "{} lists no {ip}: {text}",
                        h.name()
                    );
                    if text.contains("established") {
                        return Ok(Some(format!("{}:\n{text}", h.name())));
                    }
                }
                Ok(None)
            },
        )?;
        for h in [h1, h2] {
            h.run("iptables", ["-D"].iter().chain(&block))?.ok()?;
        }
        wait_established(h1, &a2)?;
        wait_established(h2, &a1)?;
        Ok(())
    })
}
