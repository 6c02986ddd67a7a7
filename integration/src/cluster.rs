//! Several test hosts on one simulated LAN.
//!
//! The [`Underlay`] is a network namespace of the run (`wv<run>u<n>`) holding a bridge `br0`.
//! Each host joins it with a veth pair: `eth0` in the host, `h<n>` on the bridge; host number `n`
//! (1-based) gets 192.0.2.(10+n)/24 (TEST-NET-1, RFC 5737: never routed anywhere). Traffic between
//! hosts stays inside namespaces this run created.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};

use crate::host::{log, Host};
use crate::run::{self, RunDir};
use crate::sys;

/// The underlay's subnet prefix length; addresses are 192.0.2.(10+n).
pub const UNDERLAY_PREFIX: u8 = 24;
/// The name of each host's interface on the underlay.
pub const UNDERLAY_IFACE: &str = "eth0";
const UNDERLAY_BRIDGE: &str = "br0";

/// The underlay address of host number `n` (1-based).
pub fn underlay_addr(n: u8) -> Result<Ipv4Addr> {
    if n == 0 || n > 200 {
        bail!("underlay host number {n} out of range 1..=200");
    }
    Ok(Ipv4Addr::new(192, 0, 2, 10 + n))
}

/// A simulated LAN: a netns with a bridge that hosts are plugged into.
pub struct Underlay {
    name: String,
    // Keeps the run directory (and run id) alive as long as the netns.
    run: Arc<RunDir>,
    next: AtomicU8,
}

impl Underlay {
    pub fn new() -> Result<Underlay> {
        let run = run::acquire()?;
        let name = run.fresh_name('u');
        sys::run_quiet("ip", &["netns", "add", &name]).map_err(|e| anyhow!(e))?;
        let underlay = Underlay {
            name,
            run,
            next: AtomicU8::new(1),
        };
        let ip = |args: &[&str]| -> Result<()> {
            let mut full = vec!["-n", underlay.name.as_str()];
            full.extend_from_slice(args);
            sys::run_quiet("ip", &full)
                .map(drop)
                .map_err(|e| anyhow!(e))
        };
        ip(&["link", "set", "lo", "up"])?;
        ip(&["link", "add", UNDERLAY_BRIDGE, "type", "bridge"])?;
        ip(&["link", "set", UNDERLAY_BRIDGE, "up"])?;
        Ok(underlay)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Plugs `host` in as the next host number; returns its address.
    pub fn attach(&self, host: &Host) -> Result<Ipv4Addr> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.attach_as(host, n)
    }

    /// Plugs `host` in as host number `n` (1-based): 192.0.2.(10+n)/24 on its `eth0`
    /// ([`UNDERLAY_IFACE`]).
    pub fn attach_as(&self, host: &Host, n: u8) -> Result<Ipv4Addr> {
        let addr = underlay_addr(n)?;
        let port = format!("h{n}");
        let ul = |args: &[&str]| -> Result<()> {
            let mut full = vec!["-n", self.name.as_str()];
            full.extend_from_slice(args);
            sys::run_quiet("ip", &full)
                .map(drop)
                .map_err(|e| anyhow!(e))
        };
        ul(&[
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            UNDERLAY_IFACE,
            "netns",
            host.name(),
        ])
        .with_context(|| format!("plugging {} into underlay {}", host.name(), self.name))?;
        ul(&["link", "set", &port, "master", UNDERLAY_BRIDGE, "up"])?;
        let cidr = format!("{addr}/{UNDERLAY_PREFIX}");
        for args in [
            vec!["addr", "add", cidr.as_str(), "dev", UNDERLAY_IFACE],
            vec!["link", "set", UNDERLAY_IFACE, "up"],
        ] {
            host.run("ip", &args)?.ok()?;
        }
        host.set_underlay_addr(addr)?;
        Ok(addr)
    }
}

impl Drop for Underlay {
    fn drop(&mut self) {
        sys::kill_netns_processes(&self.name, std::time::Duration::from_secs(5));
        if let Err(err) = sys::run_quiet("ip", &["netns", "del", &self.name]) {
            log(&err);
        }
    }
}

/// `n` hosts on one underlay; host `i` (0-based index) is 192.0.2.(11+i).
pub struct Cluster {
    // Declared before the underlay: hosts are torn down first.
    hosts: Vec<Host>,
    underlay: Underlay,
}

impl Cluster {
    /// Starts `n` hosts in parallel and plugs them into a new underlay.
    pub fn new(n: usize) -> Result<Cluster> {
        if n == 0 || n > 200 {
            bail!("a cluster has 1..=200 hosts, not {n}");
        }
        let underlay = Underlay::new()?;
        // Names in host order, then the (slow) start-ups in parallel.
        let names: Vec<String> = (0..n).map(|_| underlay.run.fresh_name('h')).collect();
        let started: Vec<Result<Host>> = std::thread::scope(|s| {
            let handles: Vec<_> = names
                .into_iter()
                .map(|name| {
                    let run = Arc::clone(&underlay.run);
                    s.spawn(move || Host::named(run, name))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow!("host start-up panicked")))
                })
                .collect()
        });
        // On any failure the started hosts drop (tear down) here.
        let hosts = started.into_iter().collect::<Result<Vec<Host>>>()?;
        for host in &hosts {
            underlay.attach(host)?;
        }
        Ok(Cluster { hosts, underlay })
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Host by 0-based index.
    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    pub fn underlay(&self) -> &Underlay {
        &self.underlay
    }

    /// Cuts all traffic between hosts `a` and `b` (0-based), both ways.
    pub fn partition(&self, a: usize, b: usize) -> Result<()> {
        self.hosts[a].block(&self.hosts[b])
    }

    /// Undoes [`Cluster::partition`].
    pub fn heal(&self, a: usize, b: usize) -> Result<()> {
        self.hosts[a].unblock(&self.hosts[b])
    }

    /// Runs `scenario`; when it fails, prints every host's diagnostics (to stderr) before
    /// returning the error.
    pub fn scenario(&self, scenario: impl FnOnce(&Cluster) -> Result<()>) -> Result<()> {
        scenario(self).inspect_err(|_| {
            for host in &self.hosts {
                eprintln!("{}", host.diagnostics());
            }
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Hosts go down in parallel (each takes about a second); the underlay drops after them.
        std::thread::scope(|s| {
            for host in &mut self.hosts {
                s.spawn(move || host.teardown());
            }
        });
    }
}

impl std::ops::Index<usize> for Cluster {
    type Output = Host;

    fn index(&self, i: usize) -> &Host {
        &self.hosts[i]
    }
}
