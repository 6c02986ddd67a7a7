//! Container traffic between hosts, end to end: `weave launch [--password P] <peers>` on each
//! host, then plain `docker run` through each host's proxy, as a user would.
//!
//! - relaying: h1 and h3 cannot reach each other on the underlay, h2 carries their traffic;
//! - a wrong password keeps the hosts apart while each host's own containers still talk;
//! - on the wire (a capture of the underlay in h1's netns), a password hides what containers send,
//!   and without one the same check finds it (so the check can fail);
//! - restarting a router (`weave stop` + `weave launch`) lets traffic resume;
//! - UDP across hosts;
//! - TCP fits itself to an underlay MTU smaller than the containers' (ICMP "fragmentation
//!   needed" from the router), and big pings cross one that drops IP fragments (the router
//!   fragments);
//! - subnets stay isolated across hosts.
//!
//! Container names have two characters at least: dockerd refuses shorter ones.

use anyhow::{bail, ensure, Context, Result};
use weave_integration::weave::{
    launch, launch_pair_with, peer_name, status, underlay as addr, unicast_via, wait_established,
};
use weave_integration::{
    eventually, never, patience, quiet_period, Background, Cluster, Host, Out, UNDERLAY_IFACE,
};

/// One ping from container `from` on `h` to `target`.
fn ping(h: &Host, from: &str, target: &str) -> Result<Out> {
    h.docker(["exec", from, "ping", "-c1", "-W1", target])
}

/// Waits until container `from` on `h` gets a ping answer from `target`.
fn wait_ping(h: &Host, from: &str, target: &str) -> Result<()> {
    eventually(
        &format!("a ping from {from} on {} to {target}", h.name()),
        patience(),
        || ping(h, from, target)?.ok(),
    )?;
    Ok(())
}

/// `from` on `h` must get no ping answer from `target` for the quiet period: each look is a
/// ping that must have been sent (busybox's summary line) and got nothing back.
fn never_pings(h: &Host, from: &str, target: &str, why: &str) -> Result<()> {
    never(
        &format!("{from} on {} reaches {target} ({why})", h.name()),
        quiet_period(),
        || {
            let out = h.docker(["exec", from, "ping", "-c1", "-W1", target])?;
            if out.success() {
                return Ok(Some(out.to_string()));
            }
            ensure!(
                out.stdout
                    .contains("1 packets transmitted, 0 packets received"),
                "the ping did not run:\n{out}"
            );
            Ok(None)
        },
    )?;
    Ok(())
}

/// TCP across with busybox nc: `server` on `hs` listens on `port` and sends `text` to the first
/// client; `client` on `hc` connects to `target` until it reads `text`.
fn tcp_across(
    (hs, server): (&Host, &str),
    (hc, client): (&Host, &str),
    target: &str,
    port: u16,
    text: &str,
) -> Result<()> {
    let script = format!("echo {text} | nc -l -p {port}");
    hs.docker(["exec", "-d", server, "sh", "-c", &script])?
        .ok()?;
    let port = port.to_string();
    eventually(
        &format!("nc from {client} to {target}:{port}"),
        patience(),
        || {
            let out = hc
                .docker(["exec", client, "nc", "-w", "2", target, &port])?
                .ok()?;
            ensure!(out.stdout.contains(text), "{text} not received: {out}");
            Ok(())
        },
    )
}

#[test]
fn traffic_is_relayed_when_hosts_cannot_reach_each_other() -> Result<()> {
    let cluster = Cluster::new(3)?;
    cluster.scenario(|c| {
        let (h1, h2, h3) = (c.host(0), c.host(1), c.host(2));
        let (a1, a2, a3) = (addr(h1)?, addr(h2)?, addr(h3)?);
        // Before any launch: h1 and h3 never see each other on the underlay.
        c.partition(0, 2)?;
        let cut = h3.run("ping", ["-c1", "-W1", &a1])?;
        ensure!(!cut.success(), "h1 and h3 must be partitioned: {cut}");
        launch(h1, &[])?;
        launch(h2, &[&a1])?;
        launch(h3, &[&a2])?;
        wait_established(h2, &a1)?;
        wait_established(h3, &a2)?;
        h1.run_woven_sleeper("relay-left", "10.35.1.1/24")?;
        h3.run_woven_sleeper("relay-right", "10.35.1.3/24")?;
        wait_ping(h3, "relay-right", "10.35.1.1")?;
        tcp_across(
            (h1, "relay-left"),
            (h3, "relay-right"),
            "10.35.1.1",
            4422,
            "relayed-over-tcp",
        )?;
        // The relay is the only way: h1 and h3 still have no established connection.
        for (h, other) in [(h1, &a3), (h3, &a1)] {
            let text = status(h, "connections")?;
            ensure!(
                !text
                    .lines()
                    .any(|l| l.contains(&format!(" {other}:")) && l.contains("established")),
                "{} must have no established connection with {other} (partitioned):\n{text}",
                h.name()
            );
        }
        Ok(())
    })
}

#[test]
fn wrong_password_keeps_hosts_apart_but_each_host_works() -> Result<()> {
    let cluster = Cluster::new(2)?;
    cluster.scenario(|c| {
        let (h1, h2) = (c.host(0), c.host(1));
        let a1 = addr(h1)?;
        launch(h1, &["--password", "s3cret"])?;
        // The addresses are inside IPAM's range, so claiming them needs a ring: h2, which can
        // never reach the peer it was given, must not wait for it to agree.
        launch(
            h2,
            &["--password", "wrong", "--ipalloc-init", "consensus=1", &a1],
        )?;
        h1.run_woven_sleeper("pw-one", "10.35.1.1/24")?;
        h1.run_woven_sleeper("pw-two", "10.35.1.2/24")?;
        h2.run_woven_sleeper("pw-three", "10.35.1.3/24")?;
        h2.run_woven_sleeper("pw-four", "10.35.1.4/24")?;
        // Each host on its own still works.
        wait_ping(h1, "pw-one", "10.35.1.2")?;
        wait_ping(h2, "pw-three", "10.35.1.4")?;
        // Across: never.
        never_pings(h2, "pw-three", "10.35.1.1", "wrong password")?;
        never_pings(h1, "pw-two", "10.35.1.4", "wrong password")?;
        // And the local ones still do afterwards.
        ping(h1, "pw-two", "10.35.1.1")?
            .ok()
            .context("h1's containers still talk")?;
        ping(h2, "pw-four", "10.35.1.3")?
            .ok()
            .context("h2's containers still talk")?;
        Ok(())
    })
}

/// busybox `ping -p` takes one byte (hex) and fills the payload with it: 200 bytes of 0xde.
const PING_PATTERN_HEX: &str = "de";
/// A run of the pattern byte: far longer than any chance run in ciphertext.
const PING_PATTERN: [u8; 128] = [0xde; 128];
const TCP_MARKER: &str = "weave-wire-marker-q7zx";

/// Captures the whole underlay of h1 (its `eth0`) while h2's container pings h1's with a payload
/// pattern and reads a marker string over TCP from it; both hosts launched with `launch_args`.
/// Returns the capture's bytes.
fn capture_across(launch_args: &[&str]) -> Result<Vec<u8>> {
    let cluster = Cluster::new(2)?;
    let mut captured = Vec::new();
    cluster.scenario(|c| {
        let (h1, h2) = (c.host(0), c.host(1));
        launch_pair_with(h1, h2, launch_args)?;
        h1.run_woven_sleeper("wire-left", "10.35.1.1/24")?;
        h2.run_woven_sleeper("wire-right", "10.35.1.2/24")?;
        wait_ping(h2, "wire-right", "10.35.1.1")?;

        let file = h1.dir().join("underlay.pcap");
        // --immediate-mode and -U: each packet reaches the file at once (the capture is killed,
        // not stopped); -Z root: keep writing to the root-owned host directory.
        let tcpdump = h1
            .cmd("tcpdump")
            .args([
                "-i",
                "eth0",
                "-n",
                "-s",
                "0",
                "--immediate-mode",
                "-U",
                "-Z",
                "root",
                "-w",
            ])
            .arg(&file)
            .spawn()?;
        eventually("tcpdump listening on h1's eth0", patience(), || {
            ensure!(
                tcpdump.stderr().contains("listening on"),
                "tcpdump not ready: {}",
                tcpdump.stderr()
            );
            Ok(())
        })?;
        h2.docker([
            "exec",
            "wire-right",
            "ping",
            "-c3",
            "-W1",
            "-p",
            PING_PATTERN_HEX,
            "-s",
            "200",
            "10.35.1.1",
        ])?
        .ok()
        .context("ping with a pattern across hosts")?;
        tcp_across(
            (h1, "wire-left"),
            (h2, "wire-right"),
            "10.35.1.1",
            4433,
            TCP_MARKER,
        )?;
        // The capture must hold the containers' traffic (in sleeve datagrams), or finding
        // nothing in it proves nothing: 3 pings and their answers, and a TCP exchange. Waiting
        // for them also lets the last packets reach the file.
        eventually("the traffic across in h1's capture", patience(), || {
            let sleeve = h1
                .cmd("tcpdump")
                .args(["-n", "-r"])
                .arg(&file)
                .args(["udp", "port", "6783"])
                .ok()?;
            let datagrams = sleeve.stdout.lines().count();
            ensure!(
                datagrams >= 12,
                "{datagrams} sleeve datagrams in the capture; tcpdump: {}\n{}",
                tcpdump.stderr(),
                sleeve.stdout
            );
            Ok(())
        })?;
        let (_, stderr) = tcpdump.stop();
        captured = std::fs::read(&file)
            .with_context(|| format!("reading the capture {}: {stderr}", file.display()))?;
        eprintln!(
            "captured {} bytes on h1's underlay ({})",
            captured.len(),
            stderr.trim()
        );
        Ok(())
    })?;
    Ok(captured)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn password_hides_container_traffic_on_the_wire() -> Result<()> {
    let captured = capture_across(&["--password", "s3cret"])?;
    ensure!(
        !contains(&captured, &PING_PATTERN),
        "the ping payload pattern must not be visible on the underlay with a password"
    );
    ensure!(
        !contains(&captured, TCP_MARKER.as_bytes()),
        "the TCP payload must not be visible on the underlay with a password"
    );
    Ok(())
}

/// Both payloads `capture_across` sends must be in `captured` (`when`: the setting under test).
fn payloads_visible(captured: &[u8], when: &str) -> Result<()> {
    ensure!(
        contains(captured, &PING_PATTERN),
        "the ping payload pattern must be visible on the underlay {when}"
    );
    ensure!(
        contains(captured, TCP_MARKER.as_bytes()),
        "the TCP payload must be visible on the underlay {when}"
    );
    Ok(())
}

#[test]
fn without_password_container_traffic_is_visible_on_the_wire() -> Result<()> {
    // The control of the test above: the same check finds the payloads when nothing encrypts.
    payloads_visible(&capture_across(&[])?, "without a password")
}

#[test]
fn traffic_resumes_after_router_restart() -> Result<()> {
    let cluster = Cluster::new(2)?;
    cluster.scenario(|c| {
        let (h1, h2) = (c.host(0), c.host(1));
        let (a1, a2) = (addr(h1)?, addr(h2)?);
        let args2 = ["--password", "s3cret", a1.as_str()];
        launch(h1, &["--password", "s3cret"])?;
        launch(h2, &args2)?;
        h1.run_woven_sleeper("rs-left", "10.35.1.1/24")?;
        h2.run_woven_sleeper("rs-right", "10.35.1.2/24")?;
        wait_ping(h2, "rs-right", "10.35.1.1")?;

        h2.weave(["stop"])?.ok().context("weave stop on h2")?;
        let down = ping(h2, "rs-right", "10.35.1.1")?;
        ensure!(
            !down.success(),
            "no traffic across while h2's router is stopped: {down}"
        );
        launch(h2, &args2).context("weave launch again on h2")?;
        wait_established(h2, &a1)?;
        wait_established(h1, &a2)?;
        wait_ping(h2, "rs-right", "10.35.1.1")?;
        wait_ping(h1, "rs-left", "10.35.1.2")?;
        tcp_across(
            (h1, "rs-left"),
            (h2, "rs-right"),
            "10.35.1.1",
            4444,
            "after-restart",
        )?;
        // A container started after the restart is reachable too.
        h2.run_woven_sleeper("rs-late", "10.35.1.3/24")?;
        wait_ping(h1, "rs-left", "10.35.1.3")?;
        Ok(())
    })
}

/// A UDP server on `port` in the network namespace of container `name` on `h`, printing every
/// datagram it gets as `got:<payload>`. The test image's busybox has neither `nc -u` nor
/// `udpsvd`, so the server is the host's perl, run in the container's netns.
fn udp_server(h: &Host, name: &str, port: u16) -> Result<Background> {
    let pid = h
        .docker(["inspect", "-f", "{{.State.Pid}}", name])?
        .ok()?
        .stdout_trim()
        .to_string();
    let script = format!(
        "$|=1; my $s = IO::Socket::INET->new(LocalAddr => '0.0.0.0', LocalPort => {port}, \
         Proto => 'udp') or die \"bind: $!\"; print \"ready\\n\"; \
         while (1) {{ $s->recv(my $m, 4096); print \"got:$m\\n\"; }}"
    );
    let mut server = h
        .cmd("nsenter")
        .args([
            "-t",
            &pid,
            "-n",
            "perl",
            "-MIO::Socket::INET",
            "-e",
            &script,
        ])
        .spawn()?;
    server.wait_for_stdout("ready")?;
    Ok(server)
}

#[test]
fn udp_crosses_hosts() -> Result<()> {
    let cluster = Cluster::new(2)?;
    cluster.scenario(|c| {
        let (h1, h2) = (c.host(0), c.host(1));
        let a1 = addr(h1)?;
        launch(h1, &[])?;
        launch(h2, &[&a1])?;
        h1.run_woven_sleeper("udp-left", "10.35.1.1/24")?;
        h2.run_woven_sleeper("udp-right", "10.35.1.2/24")?;
        wait_ping(h2, "udp-right", "10.35.1.1")?;
        let server = udp_server(h1, "udp-left", 5555)?;
        // busybox has no UDP nc: its tftp client sends a read request, a UDP datagram holding
        // the file name, from the container on h2 to h1's.
        eventually(
            "a UDP datagram from h2's container to h1's",
            patience(),
            || {
                h2.docker([
                    "exec",
                    "udp-right",
                    "timeout",
                    "2",
                    "tftp",
                    "-g",
                    "-r",
                    "hi-over-udp",
                    "-l",
                    "/tmp/none",
                    "10.35.1.1",
                    "5555",
                ])?;
                let got = server.stdout();
                ensure!(
                    got.contains("hi-over-udp"),
                    "nothing received yet: {got}\n{}",
                    server.stderr()
                );
                Ok(())
            },
        )?;
        let (_, stderr) = server.stop();
        ensure!(!stderr.contains("bind:"), "the UDP server failed: {stderr}");
        Ok(())
    })
}

#[test]
fn subnets_stay_isolated_across_hosts() -> Result<()> {
    let cluster = Cluster::new(2)?;
    cluster.scenario(|c| {
        let (h1, h2) = (c.host(0), c.host(1));
        let a1 = addr(h1)?;
        launch(h1, &[])?;
        launch(h2, &[&a1])?;
        h1.run_woven_sleeper("iso-left", "10.35.1.1/24")?;
        h2.run_woven_sleeper("iso-same", "10.35.1.2/24")?;
        h2.run_woven_sleeper("iso-other", "10.35.2.1/24")?;
        // Control: the same subnet crosses hosts.
        wait_ping(h2, "iso-same", "10.35.1.1")?;
        never_pings(h2, "iso-other", "10.35.1.1", "another subnet")?;
        never_pings(h1, "iso-left", "10.35.2.1", "another subnet")?;
        // Neither learned the other's address: nothing crossed.
        let neigh = h1.docker(["exec", "iso-left", "ip", "neigh"])?.ok()?;
        if neigh.stdout.contains("10.35.2.1") {
            bail!("iso-left must not know 10.35.2.1:\n{neigh}");
        }
        Ok(())
    })
}

#[test]
fn trusted_subnets_leave_container_traffic_visible_on_the_wire() -> Result<()> {
    // A password, but both hosts trust the underlay's subnet: the sleeve (UDP) goes in
    // plaintext, as in Weave; only the mesh's TCP stays encrypted.
    let captured = capture_across(&["--password", "s3cret", "--trusted-subnets", "192.0.2.0/24"])?;
    payloads_visible(&captured, "between trusting peers")
}

#[test]
fn tcp_fits_itself_to_a_smaller_underlay_mtu() -> Result<()> {
    // Containers size TCP segments by ethwe's MTU (1376). Over a 1300-byte underlay the sleeve
    // cannot carry such frames whole and TCP forbids fragmenting them (DF): only the router's
    // ICMP "fragmentation needed" makes the sender shrink its segments. Without it the
    // transfer stalls after the handshake (small packets still pass).
    let cluster = Cluster::new(2)?;
    cluster.scenario(|c| {
        let (h1, h2) = (c.host(0), c.host(1));
        for h in [h1, h2] {
            h.run("ip", ["link", "set", UNDERLAY_IFACE, "mtu", "1300"])?
                .ok()?;
        }
        launch_pair_with(h1, h2, &[])?;
        h1.run_woven_sleeper("big-server", "10.35.1.1/24")?;
        h2.run_woven_sleeper("big-client", "10.35.1.2/24")?;
        wait_ping(h2, "big-client", "10.35.1.1")?;
        // busybox nc: the server sends and hangs up; the client keeps its stdin open (sleep) so
        // that it does not hang up first, and gives up after 6 s if the transfer stalls.
        let serve =
            "while true; do dd if=/dev/zero bs=1000 count=500 2>/dev/null | nc -l -p 4456; done";
        h1.docker(["exec", "-d", "big-server", "sh", "-c", serve])?
            .ok()?;
        eventually(
            "500000 bytes from h1's container to h2's",
            patience(),
            || {
                let out = h2
                    .docker([
                        "exec",
                        "big-client",
                        "sh",
                        "-c",
                        "sleep 2 | timeout 6 nc 10.35.1.1 4456 | wc -c",
                    ])?
                    .ok()?;
                ensure!(out.stdout_trim() == "500000", "short transfer: {out}");
                Ok(())
            },
        )?;
        // The connection shows the MTU the smaller path allows.
        let line = wait_established(h1, &addr(h2)?)?;
        let mtu: u32 = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("mtu="))
            .and_then(|m| m.parse().ok())
            .with_context(|| format!("no mtu= in {line:?}"))?;
        ensure!(mtu < 1300 - 28, "the MTU must follow the path: {line}");
        Ok(())
    })
}

/// `h` has no established connection with the host at `ip`.
fn not_established(h: &Host, ip: &str, why: &str) -> Result<()> {
    let text = status(h, "connections")?;
    ensure!(
        !text
            .lines()
            .any(|l| l.contains(&format!(" {ip}:")) && l.contains("established")),
        "{} must have no established connection with {ip} ({why}):\n{text}",
        h.name()
    );
    Ok(())
}

/// Waits until `h`'s unicast route to peer `dest` goes via peer `via`.
fn wait_route(h: &Host, dest: &str, via: &str) -> Result<()> {
    eventually(
        &format!("{}'s route to {dest} via {via}", h.name()),
        patience(),
        || {
            let got = unicast_via(h, dest)?;
            ensure!(
                got.as_deref() == Some(via),
                "route to {dest} via {got:?}, not {via}"
            );
            Ok(())
        },
    )
}

/// One ping from container `from` on `h` to `target` must get through within `tries` quick
/// attempts: no time for the mesh to notice a change and re-route.
fn pings_at_once(h: &Host, from: &str, target: &str, tries: u32, why: &str) -> Result<()> {
    let mut last = None;
    for _ in 0..tries {
        let out = ping(h, from, target)?;
        if out.success() {
            return Ok(());
        }
        last = Some(out);
    }
    bail!(
        "{from} on {} must reach {target} at once ({why}); last attempt:\n{}",
        h.name(),
        last.map(|o| o.to_string()).unwrap_or_default()
    )
}

#[test]
fn routes_switch_back_to_direct_when_the_underlay_heals() -> Result<()> {
    let cluster = Cluster::new(3)?;
    cluster.scenario(|c| {
        let (h1, h2, h3) = (c.host(0), c.host(1), c.host(2));
        let (a1, a2, a3) = (addr(h1)?, addr(h2)?, addr(h3)?);
        c.partition(0, 2)?;
        launch(h1, &[])?;
        launch(h2, &[&a1])?;
        launch(h3, &[&a2])?;
        wait_established(h2, &a1)?;
        wait_established(h3, &a2)?;
        let (n1, n2, n3) = (peer_name(h1)?, peer_name(h2)?, peer_name(h3)?);
        h1.run_woven_sleeper("heal-left", "10.35.1.1/24")?;
        h3.run_woven_sleeper("heal-right", "10.35.1.3/24")?;
        wait_ping(h1, "heal-left", "10.35.1.3")?;
        wait_ping(h3, "heal-right", "10.35.1.1")?;
        // Relayed: no direct connection, and each routes to the other via h2.
        not_established(h1, &a3, "partitioned")?;
        not_established(h3, &a1, "partitioned")?;
        wait_route(h1, &n3, &n2)?;
        wait_route(h3, &n1, &n2)?;

        // Discovery alone reconnects them: each keeps dialling the other (backoff from 2 s,
        // growing by half; a dial gives up after 10 s), so a dial is nearly always in flight and
        // its SYN retransmission gets through about a second after the heal, even after a
        // minute's partition. No `weave connect` needed.
        c.heal(0, 2)?;
        wait_established(h1, &a3)?;
        wait_established(h3, &a1)?;
        wait_route(h1, &n3, &n3)?;
        wait_route(h3, &n1, &n1)?;
        wait_ping(h1, "heal-left", "10.35.1.3")?;
        wait_ping(h3, "heal-right", "10.35.1.1")?;

        // The traffic really goes direct: cut h1 off h2, and the containers still talk at
        // once, before the mesh could notice the cut (h1 still lists h2 as established).
        c.partition(0, 1)?;
        let cut = h1.run("ping", ["-c1", "-W1", &a2])?;
        ensure!(!cut.success(), "h1 and h2 must be partitioned: {cut}");
        pings_at_once(h1, "heal-left", "10.35.1.3", 3, "direct route")?;
        pings_at_once(h3, "heal-right", "10.35.1.1", 3, "direct route")?;
        let text = status(h1, "connections")?;
        ensure!(
            text.lines()
                .any(|l| l.contains(&format!(" {a2}:")) && l.contains("established")),
            "h1 must not have noticed the cut yet (else the pings prove nothing):\n{text}"
        );
        ensure!(
            unicast_via(h1, &n3)?.as_deref() == Some(n3.as_str()),
            "h1 still routes to h3 directly: {:?}",
            unicast_via(h1, &n3)?
        );
        Ok(())
    })
}

#[test]
fn big_pings_cross_an_underlay_that_drops_ip_fragments() -> Result<()> {
    // The containers' stack cuts an 8000-byte ping into 1376-byte fragments (no DF), which a
    // 1300-byte underlay cannot carry in one datagram. The kernel would fragment our UDP, but
    // both hosts drop IP fragments: the sleeve's fragmentation test fails, and the router must
    // cut the inner IPv4 packets itself so that every piece crosses whole.
    let cluster = Cluster::new(2)?;
    cluster.scenario(|c| {
        let (h1, h2) = (c.host(0), c.host(1));
        for h in [h1, h2] {
            h.run("ip", ["link", "set", UNDERLAY_IFACE, "mtu", "1300"])?
                .ok()?;
            // Dropped at the device's ingress hook, before netfilter's defragmentation could put
            // them together: every IPv4 packet with more-fragments set, so no fragmented
            // datagram survives.
            let hook =
                format!("{{ type filter hook ingress device {UNDERLAY_IFACE} priority -500; }}");
            for args in [
                vec!["add", "table", "netdev", "weave_test"],
                vec!["add", "chain", "netdev", "weave_test", "ingress", &hook],
                vec![
                    "add",
                    "rule",
                    "netdev",
                    "weave_test",
                    "ingress",
                    "ip",
                    "frag-off",
                    "&",
                    "0x2000",
                    "!=",
                    "0",
                    "drop",
                ],
            ] {
                h.run("nft", &args)?.ok()?;
            }
        }
        launch_pair_with(h1, h2, &[])?;
        h1.run_woven_sleeper("frag-left", "10.35.1.1/24")?;
        h2.run_woven_sleeper("frag-right", "10.35.1.2/24")?;
        wait_ping(h2, "frag-right", "10.35.1.1")?;
        eventually("ping -s 8000 across", patience(), || {
            h2.docker([
                "exec",
                "frag-right",
                "ping",
                "-c1",
                "-W2",
                "-s",
                "8000",
                "10.35.1.1",
            ])?
            .ok()
        })?;
        Ok(())
    })
}
