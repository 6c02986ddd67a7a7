//! Steps the multi-host tests share: launching weave on a host and reading its mesh status.

use anyhow::{Context, Result};
use serde_json::Value;

use crate::{eventually, patience, Host};

/// The host's underlay address, as a `weave launch` peer argument.
pub fn underlay(h: &Host) -> Result<String> {
    Ok(h.underlay_addr()
        .context("host is not on the underlay")?
        .to_string())
}

/// `weave launch <args>` on `h`; must succeed.
pub fn launch(h: &Host, args: &[&str]) -> Result<()> {
    let mut all = vec!["launch"];
    all.extend(args);
    h.weave(&all)?.ok()?;
    Ok(())
}

/// `weave status <sub>` on `h`.
pub fn status(h: &Host, sub: &str) -> Result<String> {
    Ok(h.weave(["status", sub])?.ok()?.stdout)
}

/// `weave report`, parsed.
pub fn report(h: &Host) -> Result<Value> {
    let out = h.weave(["report"])?.ok()?;
    serde_json::from_str(&out.stdout).with_context(|| format!("report is not JSON: {out}"))
}

/// The peer name of the router on `h`.
pub fn peer_name(h: &Host) -> Result<String> {
    Ok(h.weave(["report", "-f", "{{.Router.Name}}"])?
        .ok()?
        .stdout_trim()
        .to_string())
}

/// The `Via` of the unicast route to peer `dest` in `h`'s report, if it has one.
pub fn unicast_via(h: &Host, dest: &str) -> Result<Option<String>> {
    let report = report(h)?;
    Ok(report["Router"]["UnicastRoutes"]
        .as_array()
        .and_then(|routes| routes.iter().find(|r| r["Dest"] == dest))
        .and_then(|r| r["Via"].as_str())
        .map(str::to_string))
}

/// Waits until `h` has an established connection with the host at `ip`; returns its line.
pub fn wait_established(h: &Host, ip: &str) -> Result<String> {
    eventually(
        &format!("{} established with {ip}", h.name()),
        patience(),
        || {
            let text = status(h, "connections")?;
            let needle = format!(" {ip}:");
            text.lines()
                .find(|l| l.contains(&needle) && l.contains("established"))
                .map(str::to_string)
                .with_context(|| format!("no established connection with {ip}:\n{text}"))
        },
    )
}

/// `weave launch [--password P]` on `h1`, then on `h2` peering with `h1`; returns once each
/// has an established connection with the other.
pub fn launch_pair(h1: &Host, h2: &Host, password: Option<&str>) -> Result<()> {
    let mut args: Vec<&str> = Vec::new();
    if let Some(p) = password {
        args.extend(["--password", p]);
    }
    launch_pair_with(h1, h2, &args)
}

/// `weave launch <args>` on `h1`, then `weave launch <args> <h1>` on `h2`; returns once each
/// has an established connection with the other.
pub fn launch_pair_with(h1: &Host, h2: &Host, args: &[&str]) -> Result<()> {
    let (a1, a2) = (underlay(h1)?, underlay(h2)?);
    let mut args = args.to_vec();
    launch(h1, &args)?;
    args.push(&a1);
    launch(h2, &args)?;
    wait_established(h1, &a2)?;
    wait_established(h2, &a1)?;
    Ok(())
}
