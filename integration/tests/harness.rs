//! Tests of the harness itself: hosts come up, run busybox, talk over the underlay, and leave
//! nothing behind. They need root but not the weave product.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Result};
use weave_integration::{docker_ping, patience, Cluster, DockerClient, Host, Via};

fn netns_exists(name: &str) -> bool {
    PathBuf::from("/run/netns").join(name).exists()
}

fn process_exists(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

#[test]
fn host_runs_busybox_with_every_docker_client() -> Result<()> {
    let h = Host::new()?;
    h.scenario(|h| {
        for client in DockerClient::every("host_runs_busybox_with_every_docker_client")? {
            let out = h
                .docker_with(client, ["run", "--rm", "busybox", "echo", "hello"])?
                .ok()?;
            ensure!(out.stdout_trim() == "hello", "{out}");
        }
        // Containers reach their host over docker0, and the host is its own machine.
        h.docker(["run", "--rm", "busybox", "ping", "-c1", "-W2", "172.17.0.1"])?
            .ok()?;
        let hostname = h.run("hostname", [] as [&str; 0])?.ok()?;
        ensure!(hostname.stdout_trim() == h.name(), "{hostname}");
        docker_ping(&h.docker_socket())?;
        // /sys shows the host's interfaces, and the cgroup mounts dockerd needs are still there.
        let net = h.run("ls", ["/sys/class/net"])?.ok()?;
        ensure!(net.stdout.lines().any(|l| l == "docker0"), "{net}");
        let cgroup = h.run("ls", ["/sys/fs/cgroup"])?.ok()?;
        ensure!(!cgroup.stdout_trim().is_empty(), "{cgroup}");
        Ok(())
    })
}

#[test]
fn host_commands_take_stdin_env_and_run_in_background() -> Result<()> {
    let h = Host::new()?;
    h.scenario(|h| {
        let echoed = h
            .docker_cmd(DockerClient::primary()?, Via::Dockerd)
            .args(["run", "-i", "--rm", "busybox", "cat"])
            .stdin("piped through\n")
            .ok()?;
        ensure!(echoed.stdout == "piped through\n", "{echoed}");

        let env = h.run_env("sh", ["-c", "echo $WV_A-$DOCKER_HOST"], &[("WV_A", "x")])?;
        ensure!(
            env.stdout_trim() == "x-",
            "DOCKER_HOST must be unset: {env}"
        );

        let proxied = h
            .docker_cmd(DockerClient::primary()?, Via::Proxy)
            .args(["version"])
            .timeout(Duration::from_secs(30))
            .run()?;
        ensure!(!proxied.success(), "no proxy runs yet: {proxied}");
        ensure!(proxied.stderr.contains("weave.sock"), "{proxied}");

        h.docker([
            "run",
            "-d",
            "--name",
            "talker",
            "busybox",
            "sh",
            "-c",
            "echo first; while [ ! -e /tmp/go ]; do sleep 0.1; done; echo second; sleep 1000",
        ])?
        .ok()?;
        let mut logs = h
            .docker_cmd(DockerClient::primary()?, Via::Dockerd)
            .args(["logs", "-f", "talker"])
            .spawn()?;
        logs.wait_for_stdout("first")?;
        ensure!(!logs.stdout().contains("second"));
        h.docker(["exec", "talker", "touch", "/tmp/go"])?.ok()?;
        logs.wait_for_stdout("second")?;
        let pid = logs.pid();
        drop(logs);
        ensure!(!process_exists(pid), "docker logs -f survived its drop");
        Ok(())
    })
}

#[test]
fn cluster_hosts_reach_each_other_on_the_underlay() -> Result<()> {
    let c = Cluster::new(2)?;
    c.scenario(|c| {
        let (a, b) = (&c[0], &c[1]);
        let (addr_a, addr_b) = (
            a.underlay_addr().expect("on the underlay"),
            b.underlay_addr().expect("on the underlay"),
        );
        ensure!(addr_a.to_string() == "192.0.2.11" && addr_b.to_string() == "192.0.2.12");
        a.run("ping", ["-c1", "-W2", &addr_b.to_string()])?.ok()?;
        b.run("ping", ["-c1", "-W2", &addr_a.to_string()])?.ok()?;
        // A container on one host reaches the other host (NAT by that host's dockerd).
        a.docker([
            "run",
            "--rm",
            "busybox",
            "ping",
            "-c1",
            "-W2",
            &addr_b.to_string(),
        ])?
        .ok()?;

        c.partition(0, 1)?;
        a.run("ping", ["-c1", "-W1", &addr_b.to_string()])?.fail()?;
        b.run("ping", ["-c1", "-W1", &addr_a.to_string()])?.fail()?;
        c.heal(0, 1)?;
        a.run("ping", ["-c1", "-W2", &addr_b.to_string()])?.ok()?;
        Ok(())
    })
}

#[test]
fn teardown_leaves_nothing_behind() -> Result<()> {
    let c = Cluster::new(1)?;
    let h = &c[0];
    h.docker([
        "run",
        "-d",
        "--restart=always",
        "--name",
        "stays",
        "busybox",
        "sleep",
        "1000",
    ])?
    .ok()?;
    let underlay = c.underlay().name().to_string();
    let name = h.name().to_string();
    let dir = h.dir().to_path_buf();
    let dockerd = h.dockerd_pid().expect("dockerd runs");
    let holder = h.namespace_pid();
    let container_pid: u32 = h
        .docker(["inspect", "-f", "{{.State.Pid}}", "stays"])?
        .ok()?
        .stdout_trim()
        .parse()?;
    ensure!(process_exists(container_pid));
    ensure!(netns_exists(&name) && netns_exists(&underlay));

    let started = std::time::Instant::now();
    drop(c);
    let took = started.elapsed();
    eprintln!("teardown took {took:?}");
    ensure!(took < patience(), "teardown took {took:?}");

    ensure!(!netns_exists(&name), "netns {name} left behind");
    ensure!(!netns_exists(&underlay), "netns {underlay} left behind");
    for (what, pid) in [
        ("dockerd", dockerd),
        ("holder", holder),
        ("container", container_pid),
    ] {
        ensure!(!process_exists(pid), "{what} (pid {pid}) left running");
    }
    ensure!(!dir.exists(), "{} left behind", dir.display());
    for controller in std::fs::read_dir("/sys/fs/cgroup")? {
        let path = controller?.path().join(&name);
        ensure!(!path.exists(), "cgroup {} left behind", path.display());
    }
    Ok(())
}
