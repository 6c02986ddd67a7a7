//! docker-py (Debian's python3-docker) through the weave proxy, against the same calls straight
//! to dockerd.
//!
//! `attach(container, stream=False, logs=True)` on an exited container: dockerd sends the 101
//! head and the output right behind it. docker-py reads the head through a buffered file and
//! the output from the raw socket, so output that arrives in the same read as the head is lost
//! to it. Straight to dockerd that is docker-py's own race (it loses some runs); through the
//! proxy the output must never be lost, because the proxy holds it until the client has read
//! the head.

use anyhow::{ensure, Context, Result};
use weave_integration::{docker_ping, Host, PROXY_DOCKER_HOST};

/// Debian's interpreter, which has python3-docker (not whatever `python3` is first on PATH).
const PYTHON: &str = "/usr/bin/python3";
const ROUNDS: u32 = 30;

/// Attaches `ROUNDS` times and prints `correct=<n> rounds=<n> first=<repr>`.
const ATTACH_SCRIPT: &str = r#"
import sys, docker
url, name, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = docker.APIClient(base_url=url, version="1.41")
outputs = [client.attach(name, stream=False, logs=True) for _ in range(rounds)]
correct = sum(1 for out in outputs if out == b"hello\n")
print("docker-py %s correct=%d rounds=%d first=%r last=%r"
      % (docker.__version__, correct, rounds, outputs[0], outputs[-1]))
"#;

fn attach_rounds(h: &Host, url: &str, name: &str) -> Result<(u32, String)> {
    let out = h
        .cmd(PYTHON)
        .args(["-c", ATTACH_SCRIPT, url, name, &ROUNDS.to_string()])
        .run()?
        .ok()?;
    let line = out.stdout_trim().to_string();
    let correct = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("correct="))
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no count in docker-py's output: {line}"))?;
    Ok((correct, line))
}

#[test]
fn docker_py_attach_logs_of_an_exited_container() -> Result<()> {
    let host = Host::new()?;
    host.scenario(|h| {
        h.weave(["launch"])?.ok()?;
        docker_ping(&h.proxy_socket())?;
        // Created straight on dockerd and waited for: it has exited with its output logged.
        h.docker(["run", "--name", "exited", "busybox", "echo", "hello"])?
            .ok()?;

        let (direct, direct_line) = attach_rounds(h, "unix:///run/docker.sock", "exited")?;
        let (proxied, proxied_line) = attach_rounds(h, PROXY_DOCKER_HOST, "exited")?;
        println!("straight to dockerd: {direct_line}");
        println!("through the proxy:   {proxied_line}");
        // Straight to dockerd is docker-py's race and not asserted; through the proxy every
        // round must see the output.
        ensure!(
            proxied == ROUNDS,
            "through the proxy docker-py got the output {proxied}/{ROUNDS} times \
             (straight to dockerd {direct}/{ROUNDS}): {proxied_line}"
        );
        Ok(())
    })
}
