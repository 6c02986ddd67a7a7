//! IP address management end to end: containers started with no `WEAVE_CIDR` (or `net:` forms,
//! or `weave attach`/`expose`/`run` with no address) get addresses from the range, unique across
//! hosts, kept across router restarts, handed over by `weave reset`, taken over by `weave rmpeer`,
//! and never duplicated by a partition.
//!
//! Addresses are read with `weave ps` (`<id> <mac> <cidr>...` per weave interface).
//! Container names have two characters at least: dockerd refuses shorter ones.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use weave_integration::weave::{launch, underlay, wait_established};
use weave_integration::{eventually, patience, Cluster, Host};

/// `a.b.c.d/len` → (address, prefix length).
fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8)> {
    let (ip, len) = s.split_once('/').with_context(|| format!("not a CIDR: {s}"))?;
    Ok((ip.parse()?, len.parse()?))
}

fn in_range(ip: Ipv4Addr, net: Ipv4Addr, len: u8) -> bool {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
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
            ensure!(in_range(ip, net, len) && l == 16, "{addrs:?} not in 172.30.0.0/16");
        }
        let (ip, l) = parse_cidr(&c[0])?;
        ensure!(
            in_range(ip, Ipv4Addr::new(172, 30, 5, 0), 24) && l == 24,
            "net:172.30.5.0/24 gave {c:?}"
        );
        ensure!(a != b && a != c && b != c, "duplicates: {a:?} {b:?} {c:?}");
        // They talk.
        let target = parse_cidr(&a[0])?.0.to_string();
        h.docker(["exec", "bb", "ping", "-c1", "-W2", &target])?.ok()?;
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
        let exposed_ip: Ipv4Addr = exposed.stdout_trim().parse().context("expose prints an IP")?;
        ensure!(in_range(exposed_ip, net, len), "expose gave {exposed_ip}");
        h.docker(["run", "-d", "--name", "dd", "busybox", "sleep", "100000"])?.ok()?;
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

        // Detach gives the address back: the next container may get it.
        h.weave(["detach", "dd"])?.ok()?;
        let hide = h.weave(["hide"])?.ok()?;
        ensure!(hide.stdout_trim() == exposed_ip.to_string(), "hide: {hide}");
        Ok(())
    })
}
