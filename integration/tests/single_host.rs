//! End to end on one host: `weave launch`, then plain docker clients (both installed ones where two
//! are), docker-compose and a bollard client talk to dockerd through the weave proxy, and weave
//! containers reach each other on their `ethwe` addresses.
//!
//! Each test starts its own host (about 0.5 s up, 1.2 s down) and launches weave on it.
//! Container names have two characters at least: dockerd refuses shorter ones.

use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use weave_integration::{
    docker_ping, eventually, parse_env_exports, patience, DockerClient, Host, Out, Via,
    PROXY_DOCKER_HOST,
};

const SLEEPER: [&str; 3] = ["busybox", "sleep", "100000"];

/// A fresh host with weave launched on it; `scenario` errors carry the host's diagnostics.
fn with_weave(scenario: impl FnOnce(&Host) -> Result<()>) -> Result<()> {
    let host = Host::new()?;
    host.scenario(|h| {
        launch(h)?;
        scenario(h)
    })
}

/// `weave launch`; once it returns the proxy must answer.
fn launch(h: &Host) -> Result<Out> {
    let out = h.weave(["launch"])?.ok()?;
    docker_ping(&h.proxy_socket()).context("the proxy must answer once `weave launch` returns")?;
    Ok(out)
}

/// Every installed docker CLI, printed; under CI=true both must be there.
fn clients(test: &str) -> Result<Vec<DockerClient>> {
    DockerClient::every(test)
}

/// `docker args` through the proxy with the primary client; must succeed.
fn proxy(h: &Host, args: &[&str]) -> Result<Out> {
    h.docker_proxy(args)?.ok()
}

/// `docker args` straight to dockerd; must succeed.
fn direct(h: &Host, args: &[&str]) -> Result<Out> {
    h.docker(args)?.ok()
}

/// Starts a detached, long-running weave container through the proxy.
fn run_weave_container(h: &Host, client: DockerClient, name: &str, cidr: &str) -> Result<()> {
    let env = format!("WEAVE_CIDR={cidr}");
    let mut args = vec!["run", "-d", "--name", name, "-e", &env];
    args.extend(SLEEPER);
    h.docker_proxy_with(client, &args)?.ok()?;
    Ok(())
}

/// A throw-away container at `cidr` pings `target` once (`wait` seconds for the reply).
fn ping_from_new_container(h: &Host, cidr: &str, target: &str, wait: u32) -> Result<Out> {
    let env = format!("WEAVE_CIDR={cidr}");
    let wait = wait.to_string();
    h.docker_proxy([
        "run", "--rm", "-e", &env, "busybox", "ping", "-c1", "-W", &wait, target,
    ])
}

/// Requires a ping that was sent and got no answer (not one that never started).
fn unanswered(out: Out, target: &str) -> Result<()> {
    let out = out.fail()?;
    ensure!(
        out.combined().contains(&format!("PING {target}"))
            || out.combined().contains("unreachable"),
        "the ping should have been tried and failed: {out}"
    );
    Ok(())
}

/// The IPv4 addresses (CIDR notation) on the container's `ethwe`; empty when there is no `ethwe`.
fn ethwe_addrs(h: &Host, container: &str) -> Result<Vec<String>> {
    let out = h.docker([
        "exec", container, "ip", "-4", "-o", "addr", "show", "dev", "ethwe",
    ])?;
    if !out.success() {
        if out.stderr.contains("ethwe") || out.stderr.contains("not exist") {
            return Ok(Vec::new());
        }
        bail!("cannot read the addresses of {container}: {out}");
    }
    Ok(out
        .stdout
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|w| *w == "inet")?;
            words.next().map(str::to_string)
        })
        .collect())
}

/// How many `ethwe` interfaces the container has.
fn ethwe_count(h: &Host, container: &str) -> Result<usize> {
    let out = direct(h, &["exec", container, "ip", "-o", "link"])?;
    Ok(out
        .stdout
        .lines()
        .filter(|line| {
            line.split_whitespace()
                .nth(1)
                .is_some_and(|ifname| ifname.starts_with("ethwe:") || ifname.starts_with("ethwe@"))
        })
        .count())
}

fn container_exists(h: &Host, name: &str) -> Result<bool> {
    Ok(h.docker(["inspect", "--type", "container", name])?
        .success())
}

#[test]
fn launch_then_plain_docker_run_pings_first_try() -> Result<()> {
    with_weave(|h| {
        // eval $(weave env)
        let env = parse_env_exports(&h.weave(["env"])?.ok()?.stdout);
        let docker_host = env
            .iter()
            .find(|(k, _)| k == "DOCKER_HOST")
            .map(|(_, v)| v.clone())
            .ok_or_else(|| anyhow!("`weave env` sets no DOCKER_HOST: {env:?}"))?;
        ensure!(docker_host == PROXY_DOCKER_HOST, "weave env: {env:?}");

        for (i, client) in clients("launch_then_plain_docker_run_pings_first_try")?
            .into_iter()
            .enumerate()
        {
            let docker = |args: &[&str]| {
                h.docker_cmd(client, Via::Dockerd)
                    .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                    .args(args)
                    .ok()
            };
            let name = format!("aa-{}", client.label());
            let server = format!("10.35.1.{}", 1 + 10 * i);
            let cidr = format!("WEAVE_CIDR={server}/24");
            let mut run = vec!["run", "-d", "--name", &name, "-e", &cidr];
            run.extend(SLEEPER);
            docker(&run)?;
            let pinger = format!("WEAVE_CIDR=10.35.1.{}/24", 2 + 10 * i);
            let out = docker(&[
                "run", "--rm", "-e", &pinger, "busybox", "ping", "-c1", &server,
            ])
            .with_context(|| format!("first ping with the {} client", client.label()))?;
            ensure!(out.stdout.contains("1 packets received"), "{out}");
        }
        Ok(())
    })
}

#[test]
fn subnets_are_isolated() -> Result<()> {
    with_weave(|h| {
        let client = DockerClient::primary()?;
        run_weave_container(h, client, "one", "10.35.1.1/24")?;
        run_weave_container(h, client, "two", "10.35.2.2/24")?;
        // The network works within a subnet...
        ping_from_new_container(h, "10.35.2.3/24", "10.35.2.2", 2)?.ok()?;
        // ...but not across subnets.
        unanswered(
            h.docker(["exec", "two", "ping", "-c1", "-W1", "10.35.1.1"])?,
            "10.35.1.1",
        )?;
        unanswered(
            ping_from_new_container(h, "10.35.2.4/24", "10.35.1.1", 1)?,
            "10.35.1.1",
        )?;
        Ok(())
    })
}

#[test]
fn attach_and_detach_a_running_container() -> Result<()> {
    with_weave(|h| {
        // Started through the proxy but left alone, and started on dockerd directly.
        let mut args = vec!["run", "-d", "--name", "cc", "-e", "WEAVE_CIDR=none"];
        args.extend(SLEEPER);
        proxy(h, &args)?;
        let mut args = vec!["run", "-d", "--name", "dd"];
        args.extend(SLEEPER);
        direct(h, &args)?;
        ensure!(
            ethwe_addrs(h, "cc")?.is_empty(),
            "WEAVE_CIDR=none must leave cc alone"
        );

        for (container, addr) in [("cc", "10.35.3.1"), ("dd", "10.35.3.5")] {
            let cidr = format!("{addr}/24");
            let attached = h.weave(["attach", &cidr, container])?.ok()?;
            ensure!(
                attached.stdout_trim().split_whitespace().any(|w| w == addr),
                "weave attach should print {addr}: {attached}"
            );
            ensure!(ethwe_addrs(h, container)? == vec![cidr.clone()]);
            ping_from_new_container(h, "10.35.3.2/24", addr, 2)?.ok()?;
        }

        h.weave(["detach", "10.35.3.1/24", "cc"])?.ok()?;
        let left = ethwe_addrs(h, "cc")?;
        ensure!(
            !left.iter().any(|a| a.starts_with("10.35.3.1/")),
            "still there: {left:?}"
        );
        unanswered(
            ping_from_new_container(h, "10.35.3.3/24", "10.35.3.1", 1)?,
            "10.35.3.1",
        )?;
        // The other container is untouched.
        ping_from_new_container(h, "10.35.3.4/24", "10.35.3.5", 2)?.ok()?;
        Ok(())
    })
}

#[test]
fn a_container_on_two_subnets_reaches_both() -> Result<()> {
    with_weave(|h| {
        let mut args = vec![
            "run",
            "-d",
            "--name",
            "mm",
            "-e",
            "WEAVE_CIDR=10.35.1.5/24 10.35.2.5/24",
        ];
        args.extend(SLEEPER);
        proxy(h, &args)?;
        let addrs = ethwe_addrs(h, "mm")?;
        for want in ["10.35.1.5/24", "10.35.2.5/24"] {
            ensure!(
                addrs.iter().any(|a| a == want),
                "{want} missing from {addrs:?}"
            );
        }
        ping_from_new_container(h, "10.35.1.6/24", "10.35.1.5", 2)?.ok()?;
        ping_from_new_container(h, "10.35.2.6/24", "10.35.2.5", 2)?.ok()?;
        Ok(())
    })
}

#[test]
fn expose_and_hide_give_the_host_an_address() -> Result<()> {
    with_weave(|h| {
        run_weave_container(h, DockerClient::primary()?, "one", "10.35.1.1/24")?;
        unanswered(h.run("ping", ["-c1", "-W1", "10.35.1.1"])?, "10.35.1.1")?;

        h.weave(["expose", "10.35.1.254/24"])?.ok()?;
        h.run("ping", ["-c1", "-W2", "10.35.1.1"])?.ok()?;
        direct(h, &["exec", "one", "ping", "-c1", "-W2", "10.35.1.254"])?;

        h.weave(["hide", "10.35.1.254/24"])?.ok()?;
        unanswered(h.run("ping", ["-c1", "-W1", "10.35.1.1"])?, "10.35.1.1")?;
        Ok(())
    })
}

#[test]
fn proxy_streams_stdin_exec_logs_and_events() -> Result<()> {
    with_weave(|h| {
        for (i, client) in clients("proxy_streams_stdin_exec_logs_and_events")?
            .into_iter()
            .enumerate()
        {
            let label = client.label();
            let docker = || h.docker_cmd(client, Via::Proxy);

            // docker run -i: stdin goes in, stdout comes back, over the hijacked attach.
            let cidr = format!("WEAVE_CIDR=10.35.1.{}/24", 20 + i);
            let echoed = docker()
                .args(["run", "-i", "--rm", "-e", &cidr, "busybox", "cat"])
                .stdin("hello\n")
                .ok()
                .with_context(|| format!("docker run -i with the {label} client"))?;
            ensure!(echoed.stdout == "hello\n", "{echoed}");

            // A container that prints a line now and another when told to.
            let name = format!("ex-{label}");
            let addr = format!("10.35.1.{}", 30 + i);
            let cidr = format!("WEAVE_CIDR={addr}/24");
            docker()
                .args(["run", "-d", "--name", &name, "-e", &cidr, "busybox", "sh", "-c"])
                .arg("echo first; while [ ! -e /tmp/go ]; do sleep 0.1; done; echo second; sleep 100000")
                .ok()?;

            // docker exec, with and without stdin.
            let shown = docker()
                .args(["exec", &name, "ip", "-4", "addr", "show", "ethwe"])
                .ok()?;
            ensure!(shown.stdout.contains(&addr), "{shown}");
            let echoed = docker()
                .args(["exec", "-i", &name, "cat"])
                .stdin("via exec\n")
                .ok()?;
            ensure!(echoed.stdout == "via exec\n", "{echoed}");

            // docker logs -f streams: the second line shows up while we follow.
            let mut logs = docker().args(["logs", "-f", &name]).spawn()?;
            logs.wait_for_stdout("first")?;
            ensure!(!logs.stdout().contains("second"), "second line too early");
            docker().args(["exec", &name, "touch", "/tmp/go"]).ok()?;
            logs.wait_for_stdout("second")?;
            drop(logs);

            // docker events streams: a container started after we began listening shows up.
            let evc = format!("ev-{label}");
            docker()
                .args([
                    "create",
                    "--name",
                    &evc,
                    "-e",
                    "WEAVE_CIDR=none",
                    "busybox",
                    "true",
                ])
                .ok()?;
            let mut events = docker()
                .args(["events", "--filter", &format!("container={evc}")])
                .args(["--filter", "event=start"])
                .args(["--format", "{{.Action}} {{.Actor.Attributes.name}}"])
                .spawn()?;
            let wanted = format!("start {evc}");
            eventually(&format!("a start event for {evc}"), patience(), || {
                // Until the event stream is up, a start may go unseen: start again then.
                docker().args(["start", &evc]).ok()?;
                events.wait_for(&wanted, Duration::from_secs(2), |out| out.contains(&wanted))
            })?;

            // docker run -it: a real pty (util-linux `script`), output and exit status come back.
            let cidr = format!("WEAVE_CIDR=10.35.1.{}/24", 40 + i);
            let command = format!(
                "{} run -it --rm -e {cidr} busybox sh -c 'echo tty-ok; exit 3'",
                client.path().display()
            );
            let tty = h
                .cmd("script")
                .args(["-qec", &command, "/dev/null"])
                .env("DOCKER_HOST", PROXY_DOCKER_HOST)
                .run()?;
            ensure!(
                tty.status.code() == Some(3) && tty.stdout.contains("tty-ok"),
                "docker run -it with the {label} client: {tty}"
            );

            // docker attach (hijacked, output only): joins a running container, streams what
            // it prints, and returns when it exits. (Stdin half-close is covered by `run -i`
            // above: an attach client closing stdin does not end a `run -d -i` container.)
            let att = format!("at-{label}");
            docker()
                .args([
                    "run",
                    "-d",
                    "--name",
                    &att,
                    "-e",
                    "WEAVE_CIDR=none",
                    "busybox",
                ])
                .args(["sh", "-c", "sleep 2; echo through attach; sleep 1"])
                .ok()?;
            let attached = docker()
                .args(["attach", "--no-stdin", &att])
                .ok()
                .with_context(|| format!("docker attach with the {label} client"))?;
            ensure!(attached.stdout.contains("through attach"), "{attached}");
        }
        Ok(())
    })
}

#[test]
fn docker_build_through_the_proxy() -> Result<()> {
    with_weave(|h| {
        let context = h.build_context("hi", "FROM busybox\nRUN echo hi > /hi\n")?;
        for client in clients("docker_build_through_the_proxy")? {
            let tag = format!("built-{}", client.label());
            h.docker_cmd(client, Via::Proxy)
                .env("DOCKER_BUILDKIT", "0")
                .args(["build", "-t", &tag])
                .arg(&context)
                .ok()
                .with_context(|| format!("docker build with the {} client", client.label()))?;
            let out = proxy(
                h,
                &["run", "--rm", "-e", "WEAVE_CIDR=none", &tag, "cat", "/hi"],
            )?;
            ensure!(out.stdout_trim() == "hi", "{out}");
        }
        Ok(())
    })
}

#[test]
fn compose_up_and_down_through_the_proxy() -> Result<()> {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../docker-compose.yml");
    with_weave(|h| {
        let compose = |args: &[&str]| {
            h.cmd("docker-compose")
                .env("DOCKER_HOST", PROXY_DOCKER_HOST)
                .args(["--ansi", "never", "-p", "wvtest", "-f", file])
                .args(args)
                .ok()
        };
        compose(&["up", "-d"])?;
        // The client fetches the server's page over the weave network, then idles.
        eventually("the compose client to reach the server", patience(), || {
            let logs = compose(&["logs", "--no-color", "client"])?;
            ensure!(logs.stdout.contains("hello from server"), "{logs}");
            Ok(())
        })?;
        let served = compose(&[
            "exec",
            "-T",
            "client",
            "sh",
            "-c",
            r#"printf "GET / HTTP/1.0\r\n\r\n" | nc -w 2 10.35.9.1 80"#,
        ])?;
        ensure!(served.stdout.contains("hello from server"), "{served}");
        compose(&["down"])?;
        let left = direct(
            h,
            &[
                "ps",
                "-aq",
                "--filter",
                "label=com.docker.compose.project=wvtest",
            ],
        )?;
        ensure!(
            left.stdout_trim().is_empty(),
            "compose down left containers: {left}"
        );
        Ok(())
    })
}

#[test]
fn the_command_starts_after_the_network_is_up() -> Result<()> {
    with_weave(|h| {
        run_weave_container(h, DockerClient::primary()?, "one", "10.35.1.1/24")?;
        // Attached run: the first thing the command does is use ethwe.
        proxy(
            h,
            &[
                "run",
                "--rm",
                "-e",
                "WEAVE_CIDR=10.35.1.2/24",
                "busybox",
                "sh",
                "-c",
                "ip -4 addr show ethwe | grep -q 10.35.1.2/24 && ping -c1 -W2 10.35.1.1",
            ],
        )?;
        // Detached run: same, judged by the exit code.
        proxy(
            h,
            &[
                "run",
                "-d",
                "--name",
                "pinger",
                "-e",
                "WEAVE_CIDR=10.35.1.3/24",
                "busybox",
                "sh",
                "-c",
                "ping -c1 -W2 10.35.1.1",
            ],
        )?;
        let code = proxy(h, &["wait", "pinger"])?;
        ensure!(code.stdout_trim() == "0", "pinger exited with {code}");
        Ok(())
    })
}

#[test]
fn invalid_weave_cidr_is_refused_and_nothing_is_created() -> Result<()> {
    with_weave(|h| {
        let count = || -> Result<usize> { Ok(direct(h, &["ps", "-aq"])?.stdout.lines().count()) };
        let before = count()?;
        for bad in ["10.35.1/24", "garbage"] {
            let env = format!("WEAVE_CIDR={bad}");
            for verb in ["run", "create"] {
                let out = h
                    .docker_proxy([verb, "--name", "badcidr", "-e", &env, "busybox", "true"])?
                    .fail()?;
                ensure!(
                    out.stderr.contains("WEAVE_CIDR"),
                    "the error should name WEAVE_CIDR: {out}"
                );
                ensure!(
                    !container_exists(h, "badcidr")?,
                    "{verb} with {env} created it"
                );
            }
        }
        ensure!(count()? == before, "containers were created");
        Ok(())
    })
}

#[test]
fn stop_keeps_containers_talking_and_relaunch_readopts_them() -> Result<()> {
    with_weave(|h| {
        let client = DockerClient::primary()?;
        run_weave_container(h, client, "aa", "10.35.1.1/24")?;
        run_weave_container(h, client, "bb", "10.35.1.2/24")?;

        h.weave(["stop"])?.ok()?;
        let running = direct(h, &["ps", "--format", "{{.Names}}"])?;
        ensure!(
            !running
                .stdout
                .lines()
                .any(|n| n == "weave" || n == "weaveproxy"),
            "weave stop left its containers running: {running}"
        );
        direct(h, &["exec", "bb", "ping", "-c1", "-W2", "10.35.1.1"])?;

        launch(h)?;
        for (container, cidr) in [("aa", "10.35.1.1/24"), ("bb", "10.35.1.2/24")] {
            ensure!(
                ethwe_count(h, container)? == 1,
                "{container} has a second ethwe"
            );
            let addrs = ethwe_addrs(h, container)?;
            ensure!(addrs == vec![cidr.to_string()], "{container} has {addrs:?}");
        }
        direct(h, &["exec", "bb", "ping", "-c1", "-W2", "10.35.1.1"])?;
        ping_from_new_container(h, "10.35.1.3/24", "10.35.1.1", 2)?.ok()?;
        Ok(())
    })
}

#[test]
fn a_restarted_container_gets_its_address_back() -> Result<()> {
    with_weave(|h| {
        run_weave_container(h, DockerClient::primary()?, "ss", "10.35.1.3/24")?;
        proxy(h, &["stop", "-t", "1", "ss"])?;
        proxy(h, &["start", "ss"])?;
        ensure!(ethwe_count(h, "ss")? == 1);
        let addrs = ethwe_addrs(h, "ss")?;
        ensure!(
            addrs == vec!["10.35.1.3/24".to_string()],
            "ss has {addrs:?}"
        );
        ping_from_new_container(h, "10.35.1.4/24", "10.35.1.3", 2)?.ok()?;
        Ok(())
    })
}

#[test]
fn ps_version_status_and_a_second_launch() -> Result<()> {
    with_weave(|h| {
        run_weave_container(h, DockerClient::primary()?, "pp", "10.35.1.7/24")?;
        let id = direct(h, &["inspect", "-f", "{{.Id}}", "pp"])?;
        let short = id.stdout_trim().get(..12).unwrap_or_default().to_string();
        let mac = direct(h, &["exec", "pp", "cat", "/sys/class/net/ethwe/address"])?;
        let mac = mac.stdout_trim().to_string();

        for args in [vec!["ps"], vec!["ps", "pp"]] {
            let ps = h.weave(&args)?.ok()?;
            let line = ps
                .stdout
                .lines()
                .find(|l| {
                    l.split_whitespace()
                        .next()
                        .is_some_and(|c| c == short || c == "pp")
                })
                .ok_or_else(|| anyhow!("no line for pp ({short}) in {ps}"))?;
            let words: Vec<&str> = line.split_whitespace().collect();
            ensure!(words.contains(&mac.as_str()), "MAC {mac} missing: {line}");
            ensure!(words.contains(&"10.35.1.7/24"), "CIDR missing: {line}");
        }

        let version = h.weave(["version"])?.ok()?;
        ensure!(!version.stdout_trim().is_empty(), "{version}");
        let status = h.weave(["status"])?.ok()?;
        ensure!(!status.stdout_trim().is_empty(), "{status}");

        let again = h.weave(["launch"])?.fail()?;
        ensure!(
            again.combined().to_lowercase().contains("already running"),
            "a second launch should say weave is already running: {again}"
        );
        Ok(())
    })
}

#[test]
fn bollard_client_through_the_proxy() -> Result<()> {
    use bollard::errors::Error as BollardError;
    use bollard::models::ContainerCreateBody;
    use bollard::query_parameters::CreateContainerOptionsBuilder;
    use bollard::{ClientVersion, Docker};

    with_weave(|h| {
        let socket = h.proxy_socket();
        let socket = socket.to_str().ok_or_else(|| anyhow!("socket path"))?;
        // dockerd 20.10 speaks API 1.41 at most.
        let docker = Docker::connect_with_unix(
            socket,
            120,
            &ClientVersion {
                major_version: 1,
                minor_version: 41,
            },
        )?;
        let body = |cidr: &str| ContainerCreateBody {
            image: Some("busybox".into()),
            cmd: Some(vec!["sleep".into(), "100000".into()]),
            env: Some(vec![format!("WEAVE_CIDR={cidr}")]),
            ..Default::default()
        };
        let named = |name: &str| Some(CreateContainerOptionsBuilder::default().name(name).build());

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let refused = runtime.block_on(async {
            docker
                .create_container(named("viabollard"), body("10.35.1.4/24"))
                .await?;
            docker.start_container("viabollard", None).await?;
            let refused = docker
                .create_container(named("badbollard"), body("garbage"))
                .await;
            anyhow::Ok(refused)
        })?;
        match refused {
            Err(BollardError::DockerResponseServerError {
                status_code,
                message,
            }) => {
                ensure!(status_code == 400, "status {status_code}: {message}");
                ensure!(message.contains("WEAVE_CIDR"), "message: {message}");
            }
            other => bail!("a bad WEAVE_CIDR should give a 400, got {other:?}"),
        }
        ensure!(!container_exists(h, "badbollard")?);
        ensure!(ethwe_addrs(h, "viabollard")? == vec!["10.35.1.4/24".to_string()]);
        ping_from_new_container(h, "10.35.1.5/24", "10.35.1.4", 2)?.ok()?;
        Ok(())
    })
}

#[test]
fn env_config_run_inspect_offload_and_reset() -> Result<()> {
    let host = Host::new()?;
    host.scenario(|h| {
        h.weave(["launch", "--rewrite-inspect"])?.ok()?;
        docker_ping(&h.proxy_socket())?;

        let config = h.weave(["config"])?.ok()?;
        ensure!(
            config.stdout_trim() == format!("-H={PROXY_DOCKER_HOST}"),
            "weave config: {config}"
        );
        let restore = h
            .weave_cmd()
            .args(["env", "--restore"])
            .env("ORIG_DOCKER_HOST", "unix:///var/run/docker.sock")
            .ok()?;
        ensure!(
            restore.stdout_trim() == "DOCKER_HOST=unix:///var/run/docker.sock",
            "{restore}"
        );
        let nothing = h.weave(["env", "--restore"])?.fail()?;
        ensure!(nothing.stderr.contains("Nothing to restore"), "{nothing}");
        let usage = h.weave(["attach"])?.fail()?;
        ensure!(
            !usage.stderr.trim().is_empty(),
            "a usage error says why: {usage}"
        );

        // `weave run`: docker run -d on dockerd, then attach; prints the id.
        let mut args = vec!["run", "10.35.4.1/24", "--name", "runme"];
        args.extend(SLEEPER);
        let run = h.weave(&args)?.ok().context("weave run")?;
        let id = direct(h, &["inspect", "-f", "{{.Id}}", "runme"])?;
        ensure!(
            run.stdout.contains(id.stdout_trim()),
            "weave run prints the id: {run}"
        );
        ensure!(
            ethwe_addrs(h, "runme")? == ["10.35.4.1/24"],
            "weave run attaches the address"
        );

        // --rewrite-inspect shows the weave address; TX checksum offload is off on the host end.
        run_weave_container(h, DockerClient::primary()?, "insp", "10.35.1.21/24")?;
        let ip = proxy(
            h,
            &["inspect", "-f", "{{.NetworkSettings.IPAddress}}", "insp"],
        )?;
        ensure!(
            ip.stdout_trim() == "10.35.1.21",
            "inspect through the proxy: {ip}"
        );
        let pid = direct(h, &["inspect", "-f", "{{.State.Pid}}", "insp"])?;
        let veth = format!("vethwepl{}", pid.stdout_trim());
        let veth: String = veth.chars().take(15).collect();
        let offload = h.run("ethtool", ["-k", &veth])?.ok()?;
        ensure!(
            offload.stdout.contains("tx-checksumming: off"),
            "TX checksum offload must be off on {veth}: {offload}"
        );

        // reset: containers, bridge and rules gone; twice is fine.
        h.weave(["reset"])?.ok()?;
        h.weave(["reset"])?.ok()?;
        for name in ["weave", "weaveproxy"] {
            ensure!(
                !container_exists(h, name)?,
                "{name} should be removed by reset"
            );
        }
        ensure!(
            !h.run("ip", ["link", "show", "weave"])?.success(),
            "the weave bridge should be gone after reset"
        );
        let forward = h.run("iptables", ["-S", "FORWARD"])?.ok()?;
        ensure!(
            !forward.stdout.contains("weave"),
            "no weave rule should stay in FORWARD: {forward}"
        );
        Ok(())
    })
}
