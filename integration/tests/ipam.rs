//! IP address management end to end: containers started with no `WEAVE_CIDR` (or `net:` forms,
//! or `weave attach`/`expose`/`run` with no address) get addresses from the range, unique across
//! hosts, kept across router restarts, handed over by `weave reset`, taken over by `weave rmpeer`,
//! and never duplicated by a partition.
//!
//! Addresses are read with `weave ps` (`<id> <mac> <cidr>...` per weave interface).
//! Container names have two characters at least: dockerd refuses shorter ones.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context, Result};
use weave_integration::weave::{launch, underlay, wait_established};
use weave_integration::{eventually, patience, Cluster, Host};

/// `a.b.c.d/len` → (address, prefix length).
fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8)> {
    let (ip, len) = s
        .split_once('/')
        .with_context(|| format!("not a CIDR: {s}"))?;
    Ok((ip.parse()?, len.parse()?))
}

fn in_range(ip: Ipv4Addr, net: Ipv4Addr, len: u8) -> bool {
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    };
    u32::from(ip) & mask == u32::from(net) & mask
}

/// Every weave interface's addresses on `h`, by the 12-character id `weave ps` prints.
fn weave_ps(h: &Host) -> Result<BTreeMap<String, Vec<String>>> {
    let out = h.weave(["ps"])?.ok()?;
    Ok(out
        .stdout
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let id = words.next()?.to_string();
            let _mac = words.next()?;
            Some((id, words.map(str::to_string).collect()))
        })
        .collect())
}

/// The addresses of container `name` on `h` (by its id).
fn addrs_of(h: &Host, name: &str) -> Result<Vec<String>> {
    let id = h.docker(["inspect", "-f", "{{.Id}}", name])?.ok()?;
    let short: String = id.stdout_trim().chars().take(12).collect();
    weave_ps(h)?
        .remove(&short)
        .with_context(|| format!("{name} ({short}) has no weave interface on {}", h.name()))
}

/// `docker run -d` through the proxy with no WEAVE_CIDR (extra env given as `-e` pairs).
fn run_auto(h: &Host, name: &str, env: &[&str]) -> Result<()> {
    let mut args = vec!["run", "-d", "--name", name];
    for e in env {
        args.extend(["-e", e]);
    }
    args.extend(["busybox", "sleep", "100000"]);
    h.docker_proxy(&args)?
        .ok()
        .with_context(|| format!("docker run {name} through the proxy of {}", h.name()))?;
    Ok(())
}

fn ipam_status_line(h: &Host) -> Result<String> {
    let status = h.weave(["status"])?.ok()?.stdout;
    let mut in_ipam = false;
    for line in status.lines() {
        if line.trim() == "Service: ipam" {
            in_ipam = true;
        } else if in_ipam {
            if let Some(rest) = line.trim().strip_prefix("Status: ") {
                return Ok(rest.to_string());
            }
        }
    }
    bail!("no IPAM section in weave status:\n{status}")
}

#[test]
fn one_host_allocates_from_the_range_and_keeps_addresses_across_a_restart() -> Result<()> {
    let host = Host::new()?;
    host.scenario(|h| {
        // The seeds' deployment: a range of their own.
        launch(h, &["--ipalloc-range", "172.30.0.0/16"])?;
        let (net, len) = (Ipv4Addr::new(172, 30, 0, 0), 16);
        run_auto(h, "aa", &[])?;
        run_auto(h, "bb", &["WEAVE_CIDR=net:default"])?;
        run_auto(h, "cc", &["WEAVE_CIDR=net:172.30.5.0/24"])?;
        let (a, b, c) = (addrs_of(h, "aa")?, addrs_of(h, "bb")?, addrs_of(h, "cc")?);
        for addrs in [&a, &b] {
            ensure!(addrs.len() == 1, "one address each: {addrs:?}");
            let (ip, l) = parse_cidr(&addrs[0])?;
            ensure!(
                in_range(ip, net, len) && l == 16,
                "{addrs:?} not in 172.30.0.0/16"
            );
        }
        let (ip, l) = parse_cidr(&c[0])?;
        ensure!(
            in_range(ip, Ipv4Addr::new(172, 30, 5, 0), 24) && l == 24,
            "net:172.30.5.0/24 gave {c:?}"
        );
        ensure!(a != b && a != c && b != c, "duplicates: {a:?} {b:?} {c:?}");
        // They talk.
        let target = parse_cidr(&a[0])?.0.to_string();
        h.docker(["exec", "bb", "ping", "-c1", "-W2", &target])?
            .ok()?;
        ensure!(ipam_status_line(h)? == "ready");
        let peers = h.weave(["status", "ipam"])?.ok()?.stdout;
        ensure!(
            peers.lines().count() == 1 && peers.contains("65536 IPs (100.0% of total) (3 active)"),
            "weave status ipam:\n{peers}"
        );
        let report = h.weave(["report", "-f", "{{.IPAM.DefaultSubnet}}"])?.ok()?;
        ensure!(report.stdout_trim() == "172.30.0.0/16", "{report}");

        // The host gets an address too, and a container started straight on dockerd.
        let exposed = h.weave(["expose"])?.ok()?;
        let exposed_ip: Ipv4Addr = exposed
            .stdout_trim()
            .parse()
            .context("expose prints an IP")?;
        ensure!(in_range(exposed_ip, net, len), "expose gave {exposed_ip}");
        h.docker(["run", "-d", "--name", "dd", "busybox", "sleep", "100000"])?
            .ok()?;
        let attached = h.weave(["attach", "dd"])?.ok()?;
        let d = addrs_of(h, "dd")?;
        ensure!(
            d.len() == 1 && d[0].starts_with(&format!("{}/", attached.stdout_trim())),
            "attach printed {attached}, dd has {d:?}"
        );

        // Router restart: addresses stay, new ones do not collide with them.
        let before: BTreeSet<String> = [&a, &b, &c, &d].iter().map(|v| v[0].clone()).collect();
        h.weave(["stop"])?.ok()?;
        launch(h, &["--ipalloc-range", "172.30.0.0/16"])?;
        run_auto(h, "ee", &[])?;
        let e = addrs_of(h, "ee")?;
        ensure!(!before.contains(&e[0]), "{e:?} collides with {before:?}");
        ensure!(
            e[0].split('/').next() != Some(exposed_ip.to_string().as_str()),
            "ee got the bridge's address"
        );
        ensure!(addrs_of(h, "aa")? == a, "aa kept its address");

        // Detach gives the address back, and so does removing a container.
        let active = || -> Result<u64> {
            let out = h.weave(["report", "-f", "{{.IPAM.ActiveIPs}}"])?.ok()?;
            Ok(out.stdout_trim().parse()?)
        };
        let before = active()?;
        h.weave(["detach", "dd"])?.ok()?;
        let after = active()?;
        ensure!(
            after == before - 1,
            "detach released dd's address: {before} -> {after}; {}",
            h.weave(["report"])?.stdout
        );
        h.docker(["rm", "-f", "ee"])?.ok()?;
        eventually("ee's address released on destroy", patience(), || {
            ensure!(active()? == before - 2, "still {} active", active()?);
            Ok(())
        })?;
        let hide = h.weave(["hide"])?.ok()?;
        ensure!(hide.stdout_trim() == exposed_ip.to_string(), "hide: {hide}");
        Ok(())
    })
}

/// `weave launch <extra> <every other host>` on each host of `c`, then waits until each has an
/// established connection with every other.
fn launch_all(c: &Cluster, extra: &[&str]) -> Result<()> {
    let addrs: Vec<String> = c.hosts().iter().map(underlay).collect::<Result<_>>()?;
    for (i, h) in c.hosts().iter().enumerate() {
        let mut args: Vec<&str> = extra.to_vec();
        args.extend(
            addrs
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, a)| a.as_str()),
        );
        launch(h, &args)?;
    }
    wait_meshed(c)
}

fn wait_meshed(c: &Cluster) -> Result<()> {
    let addrs: Vec<String> = c.hosts().iter().map(underlay).collect::<Result<_>>()?;
    for (i, h) in c.hosts().iter().enumerate() {
        for (j, a) in addrs.iter().enumerate() {
            if i != j {
                wait_established(h, a)?;
            }
        }
    }
    Ok(())
}

/// Every address of every weave interface on every host of `c` (bridges included).
fn all_addrs(c: &Cluster) -> Result<Vec<(String, String)>> {
    let mut all = Vec::new();
    for h in c.hosts() {
        for (id, addrs) in weave_ps(h)? {
            for a in addrs {
                all.push((format!("{}:{id}", h.name()), a));
            }
        }
    }
    Ok(all)
}

/// No address appears twice; all are inside 10.32.0.0/12. Returns how many there are.
fn check_unique(c: &Cluster) -> Result<usize> {
    let all = all_addrs(c)?;
    let mut seen: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    for (who, cidr) in &all {
        let (ip, _) = parse_cidr(cidr)?;
        ensure!(
            in_range(ip, Ipv4Addr::new(10, 32, 0, 0), 12),
            "{who} has {cidr}, outside 10.32.0.0/12"
        );
        if let Some(other) = seen.insert(ip, who.clone()) {
            bail!("{ip} is held by both {other} and {who}");
        }
    }
    Ok(all.len())
}

/// Starts `per_host` containers on each host, `threads` at a time per host, all hosts at once.
fn start_many(c: &Cluster, prefix: &str, per_host: usize, threads: usize) -> Result<()> {
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for (hi, h) in c.hosts().iter().enumerate() {
            for t in 0..threads {
                handles.push(s.spawn(move || -> Result<()> {
                    for k in (t..per_host).step_by(threads) {
                        run_auto(h, &format!("{prefix}{hi}x{k}"), &[])?;
                    }
                    Ok(())
                }));
            }
        }
        handles
            .into_iter()
            .try_for_each(|h| h.join().map_err(|_| anyhow!("a starter panicked"))?)
    })
}

#[test]
fn three_hosts_allocate_unique_addresses_across_restarts_and_partitions() -> Result<()> {
    let cluster = Cluster::new(3)?;
    cluster.scenario(|c| {
        launch_all(c, &[])?;
        // Merely connecting starts no consensus.
        ensure!(ipam_status_line(c.host(0))? == "idle");

        // Consensus: every peer primes at once (quorum 2 of the 3 given at launch).
        let started = Instant::now();
        std::thread::scope(|s| {
            let primes: Vec<_> = c
                .hosts()
                .iter()
                .map(|h| s.spawn(move || h.weave(["prime"])?.ok()))
                .collect();
            primes
                .into_iter()
                .try_for_each(|p| p.join().map_err(|_| anyhow!("prime panicked"))?.map(drop))
        })?;
        let consensus = started.elapsed();
        println!(
            "IPAM consensus with 3 peers (weave prime on all, wall clock): {} ms",
            consensus.as_millis()
        );
        for h in c.hosts() {
            ensure!(ipam_status_line(h)? == "ready", "{} not ready", h.name());
        }
        // The ring is split among the peers the vote knew of: a quorum at least.
        let shares = c.host(0).weave(["status", "ipam"])?.ok()?.stdout;
        ensure!(
            (2..=3).contains(&shares.lines().count()),
            "two or three owners:\n{shares}"
        );

        // 60 containers, 20 per host, 4 at a time per host, all hosts at once.
        let started = Instant::now();
        start_many(c, "m", 20, 4)?;
        println!(
            "60 containers started across 3 hosts in {} ms",
            started.elapsed().as_millis()
        );
        ensure!(check_unique(c)? == 60, "60 addresses");

        // A router restart: its containers keep their addresses, new ones do not collide.
        let h2 = c.host(1);
        let before = weave_ps(h2)?;
        h2.weave(["stop"])?.ok()?;
        let others: Vec<String> = [c.host(0), c.host(2)]
            .iter()
            .map(|h| underlay(h))
            .collect::<Result<_>>()?;
        launch(h2, &[others[0].as_str(), others[1].as_str()])?;
        wait_meshed(c)?;
        let after = weave_ps(h2)?;
        for (id, addrs) in &before {
            ensure!(
                after.get(id) == Some(addrs),
                "{id} had {addrs:?}, now {:?}",
                after.get(id)
            );
        }
        for k in 0..3 {
            run_auto(h2, &format!("r{k}"), &[])?;
        }
        ensure!(check_unique(c)? == 63, "63 addresses");

        // A partition during allocation: each side allocates from its own ranges; after the
        // heal nothing is held twice.
        c.partition(0, 1)?;
        c.partition(0, 2)?;
        std::thread::scope(|s| {
            let left = s.spawn(|| -> Result<()> {
                for k in 0..4 {
                    run_auto(c.host(0), &format!("pl{k}"), &[])?;
                }
                Ok(())
            });
            let right = s.spawn(|| -> Result<()> {
                for k in 0..4 {
                    run_auto(c.host(2), &format!("pr{k}"), &[])?;
                }
                Ok(())
            });
            for side in [left, right] {
                side.join().map_err(|_| anyhow!("a side panicked"))??;
            }
            anyhow::Ok(())
        })?;
        c.heal(0, 1)?;
        c.heal(0, 2)?;
        wait_meshed(c)?;
        run_auto(c.host(1), "healed", &[])?;
        ensure!(check_unique(c)? == 72, "72 addresses");
        Ok(())
    })
}

/// The report's IPAM entries as (token, size, owner name).
fn ring_entries(h: &Host) -> Result<Vec<(Ipv4Addr, u64, String)>> {
    let report: serde_json::Value = serde_json::from_str(&h.weave(["report"])?.ok()?.stdout)?;
    report["IPAM"]["Entries"]
        .as_array()
        .context("no IPAM entries in the report")?
        .iter()
        .map(|e| {
            Ok((
                e["Token"].as_str().context("token")?.parse()?,
                e["Size"].as_u64().context("size")?,
                e["Peer"].as_str().context("peer")?.to_string(),
            ))
        })
        .collect()
}

#[test]
fn claims_reset_and_rmpeer_move_ranges_between_hosts() -> Result<()> {
    let cluster = Cluster::new(3)?;
    cluster.scenario(|c| {
        launch_all(c, &[])?;
        let names: Vec<String> = c
            .hosts()
            .iter()
            .map(weave_integration::weave::peer_name)
            .collect::<Result<_>>()?;
        c.host(0).weave(["prime"])?.ok()?;
        // Wait until every host has the ring.
        for h in c.hosts() {
            eventually(&format!("{} sees the ring", h.name()), patience(), || {
                ensure!(ipam_status_line(h)? == "ready");
                Ok(())
            })?;
        }

        // Host 0 claims an address inside another host's range: that host hands it over.
        // (Consensus may have split the ring between two of the three peers only.)
        let entries = ring_entries(c.host(0))?;
        let (token, size, owner_name) = entries
            .iter()
            .find(|(_, size, owner)| *owner != names[0] && *size > 16)
            .cloned()
            .with_context(|| format!("no range of another peer in {entries:?}"))?;
        let owner = names
            .iter()
            .position(|n| *n == owner_name)
            .context("the owner is one of ours")?;
        let third = 3 - owner;
        let wanted = Ipv4Addr::from(u32::from(token) + (size as u32) / 2 + 3);
        let env = format!("WEAVE_CIDR={wanted}/12");
        run_auto(c.host(0), "claimer", &[env.as_str()])?;
        ensure!(addrs_of(c.host(0), "claimer")? == vec![format!("{wanted}/12")]);
        // The same address on the former owner now is refused, loudly.
        let refused = c.host(owner).docker_proxy([
            "run",
            "-d",
            "--name",
            "twice",
            "-e",
            env.as_str(),
            "busybox",
            "sleep",
            "100000",
        ])?;
        let refused = refused
            .fail()
            .context("a second claim of the same address must fail")?;
        ensure!(
            refused.stderr.contains(&wanted.to_string()),
            "the error names the address: {refused}"
        );
        // The third host gets space too, by allocating.
        start_many_on(c.host(third), "third", 2)?;

        // `weave reset` on the owner hands its ranges over: the others own everything.
        c.host(owner).weave(["reset"])?.ok()?;
        eventually("the reset host's ranges handed over", patience(), || {
            let owners: BTreeSet<String> = ring_entries(c.host(0))?
                .into_iter()
                .filter(|e| e.1 > 0)
                .map(|e| e.2)
                .collect();
            ensure!(
                !owners.contains(&names[owner]),
                "the reset host still owns ranges: {owners:?}"
            );
            Ok(())
        })?;
        // ... and they allocate from them.
        start_many_on(c.host(0), "after-reset", 3)?;

        // The third host stops for good; host 0 takes its ranges over.
        c.host(third).weave(["stop"])?.ok()?;
        let out = c.host(0).weave(["rmpeer", names[third].as_str()])?.ok()?;
        let taken: u64 = out
            .stdout_trim()
            .split_whitespace()
            .next()
            .context("rmpeer prints a count")?
            .parse()?;
        ensure!(
            taken > 0
                && out
                    .stdout_trim()
                    .ends_with(&format!("IPs taken over from {}", names[third])),
            "rmpeer: {out}"
        );
        let shares = c.host(0).weave(["status", "ipam"])?.ok()?.stdout;
        ensure!(
            shares.lines().count() == 1 && shares.contains("100.0% of total"),
            "host 0 owns everything now:\n{shares}"
        );
        Ok(())
    })
}

fn start_many_on(h: &Host, prefix: &str, n: usize) -> Result<()> {
    for k in 0..n {
        run_auto(h, &format!("{prefix}{k}"), &[])?;
    }
    Ok(())
}

#[test]
fn a_request_that_cannot_be_served_fails_with_the_reason_instead_of_hanging() -> Result<()> {
    let host = Host::new()?;
    host.scenario(|h| {
        // A peer that never answers: consensus needs 2 of 2 and can never be reached.
        h.weave_cmd()
            .env("WEAVE_IPAM_TIMEOUT", "3")
            .args(["launch", "192.0.2.99"])
            .run()?
            .ok()?;
        let started = Instant::now();
        let out = h.docker_proxy([
            "run", "-d", "--name", "waiter", "busybox", "sleep", "100000",
        ])?;
        let waited = started.elapsed();
        let out = out.fail().context("no consensus: the run must fail")?;
        ensure!(
            out.stderr.contains("consensus") && out.stderr.contains("quorum 2"),
            "the Docker client is told why: {out}"
        );
        ensure!(
            waited < patience(),
            "failed after {waited:?}, not at once nor never"
        );
        let running = h
            .docker(["inspect", "-f", "{{.State.Running}}", "waiter"])?
            .ok()?;
        ensure!(
            running.stdout_trim() == "false",
            "the container must not run on without its network"
        );
        let line = ipam_status_line(h)?;
        ensure!(
            line == "awaiting consensus (quorum: 2, known: 1)",
            "weave status: {line}"
        );
        Ok(())
    })
}
