//! Runs a shell script inside a fresh test host and prints what it printed; the host is removed
//! afterwards. For exploring what works in a host:
//! `cargo run -p weave-integration --example host_shell -- script.sh` (as root).

use anyhow::{Context, Result};

fn main() -> Result<()> {
    let path = std::env::args()
        .nth(1)
        .context("usage: host_shell SCRIPT")?;
    let script = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let host = weave_integration::Host::new()?;
    let out = host.sh(&script)?;
    print!("{}", out.stdout);
    eprint!("{}", out.stderr);
    drop(host); // exit() below would skip the teardown
    std::process::exit(out.status.code().unwrap_or(1));
}
