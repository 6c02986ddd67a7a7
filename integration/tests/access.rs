//! Who may change the network on a host: root and the docker group, through the CLI; nobody
//! else, through any router or proxy endpoint, and no PID that is not a container's.
//!
//! Unprivileged clients run with `setpriv` as uid/gid 65534 (no groups), the docker group's
//! member as uid 65534 with dockerd's socket's group. Requests are made with curl (TCP and unix
//! sockets) and with the weave CLI. Every refusal is checked for its reason (an HTTP status
//! from the router, or the kernel's "Permission denied"), so a probe that did not run cannot
//! pass, and the state is checked unchanged afterwards.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use weave_integration::{docker_ping, weave_bin, Host, Out};

const NOBODY: &str = "setpriv --reuid=65534 --regid=65534 --clear-groups";
const API: &str = "http://127.0.0.1:6784";
const SOCKET: &str = "/var/run/weave/router.sock";

/// A copy of the weave binary that uid 65534 may run, whatever the checkout's permissions.
struct SharedBinary {
    dir: PathBuf,
}

impl SharedBinary {
    fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("wv-access-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        let bin = dir.join("weave");
        std::fs::copy(weave_bin(), &bin).context("copying the weave binary")?;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
        Ok(Self { dir })
    }

    fn path(&self) -> String {
        self.dir.join("weave").display().to_string()
    }
}

impl Drop for SharedBinary {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The HTTP status curl got for `method url [data]`, as `who` (a command prefix), or what
/// curl said when it got none.
fn http_status(
    h: &Host,
    who: &str,
    socket: Option<&str>,
    method: &str,
    path: &str,
    data: &str,
) -> Result<Out> {
    let via = socket
        .map(|s| format!("-v --unix-socket {s} "))
        .unwrap_or_default();
    let url = if socket.is_some() {
        format!("http://router{path}")
    } else {
        format!("{API}{path}")
    };
    h.sh(&format!(
        "{who} curl -sS -o /dev/null -w '%{{http_code}}' {via}-X {method} --data '{data}' '{url}'"
    ))
}

fn container_id_and_pid(h: &Host, name: &str) -> Result<(String, String)> {
    let out = h
        .docker(["inspect", "-f", "{{.Id}} {{.State.Pid}}", name])?
        .ok()?;
    let mut words = out.stdout.split_whitespace();
    let id = words.next().context("container id")?.to_string();
    let pid = words.next().context("container pid")?.to_string();
    Ok((id, pid))
}

#[test]
fn only_root_and_the_docker_group_change_the_network() -> Result<()> {
    let bin = SharedBinary::new()?;
    let weave = bin.path();
    let host = Host::new()?;
    host.scenario(|h| {
        h.weave(["launch"])?.ok()?;
        docker_ping(&h.proxy_socket())?;
        h.run_woven_sleeper("aa", "10.35.4.1/24")?;
        let (id, pid) = container_id_and_pid(h, "aa")?;
        let group = h
            .sh("stat -c %g /var/run/docker.sock")?
            .ok()?
            .stdout_trim()
            .to_string();
        ensure!(
            group != "0",
            "dockerd's socket should belong to the docker group"
        );

        // The socket: root and the docker group, 0660.
        let mode = h.sh(&format!("stat -c '%a %u %g' {SOCKET}"))?.ok()?;
        ensure!(
            mode.stdout_trim() == format!("660 0 {group}"),
            "router socket: {mode}"
        );

        // Unprivileged, over TCP: every changing route answers 403 (the request got there).
        let attach = format!("{{\"pid\":{pid},\"addrs\":[\"10.35.4.9/24\"]}}");
        let changes: [(&str, String, &str); 7] = [
            ("POST", format!("/attach/{id}"), attach.as_str()),
            ("POST", format!("/detach/{id}"), attach.as_str()),
            ("POST", "/expose/10.35.4.254/24".into(), ""),
            ("DELETE", "/expose/10.35.4.1/24".into(), ""),
            ("POST", "/connect".into(), "peer=127.0.0.1:7"),
            ("POST", "/forget".into(), "peer=127.0.0.1:7"),
            ("GET", format!("/interfaces/{pid}"), ""),
        ];
        for (method, path, data) in &changes {
            let out = http_status(h, NOBODY, None, method, path, data)?;
            ensure!(
                out.stdout_trim() == "403",
                "{method} {path} over TCP as nobody: {out}"
            );
        }
        // ...while reading works (the control: the same client reaches the same router).
        let out = http_status(h, NOBODY, None, "GET", "/status", "")?;
        ensure!(out.stdout_trim() == "200", "GET /status as nobody: {out}");

        // Unprivileged, over the unix sockets (router and proxy), also from a user namespace
        // where the user looks like root: the kernel refuses the connection.
        for who in [NOBODY.to_string(), format!("{NOBODY} unshare -Ur")] {
            for (socket, path) in [
                (SOCKET, "/connect"),
                ("/var/run/weave/weave.sock", "/containers/create"),
            ] {
                let out = http_status(h, &who, Some(socket), "POST", path, "peer=127.0.0.1:7")?;
                ensure!(
                    !out.success() && out.stderr.contains("Permission denied"),
                    "{who}: POST {path} on {socket} should be refused by the kernel: {out}"
                );
            }
        }
        // A network namespace of one's own (`unshare -Urn`): its PID is not a container's, so
        // not even root gets it attached, under whatever container id.
        let mut own_ns = h
            .cmd("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "unshare",
                "-Urn",
                "sleep",
                "300",
            ])
            .spawn()?;
        let own_pid = own_ns.pid().to_string();
        ensure!(own_ns.is_running(), "unshare -Urn sleep must run");
        for (container, expected) in [("mine", "404"), (id.as_str(), "400")] {
            let body = format!("{{\"pid\":{own_pid},\"addrs\":[\"10.35.4.9/24\"]}}");
            let out = http_status(
                h,
                "",
                Some(SOCKET),
                "POST",
                &format!("/attach/{container}"),
                &body,
            )?;
            ensure!(
                out.stdout_trim() == expected,
                "root attaching pid {own_pid} as {container}: {out}"
            );
        }
        drop(own_ns);

        // The CLI as nobody says why.
        for args in [
            vec!["connect", "127.0.0.1:7"],
            vec!["expose", "10.35.4.254/24"],
            vec!["hide", "10.35.4.1/24"],
            vec!["forget", "127.0.0.1:7"],
        ] {
            let out = h
                .cmd("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups", &weave])
                .args(&args)
                .run()?;
            ensure!(
                !out.success()
                    && out.stderr.contains("permission denied")
                    && out.stderr.contains("docker group"),
                "weave {args:?} as nobody: {out}"
            );
        }
        let out = h
            .cmd("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                &weave,
                "attach",
                "10.35.4.9/24",
                "aa",
            ])
            .run()?;
        ensure!(
            !out.success() && out.combined().contains("ermission denied"),
            "weave attach as nobody: {out}"
        );

        // Nothing changed.
        let targets = h.weave(["status", "targets"])?.ok()?;
        ensure!(!targets.stdout.contains("127.0.0.1"), "{targets}");
        let ps = h.weave(["ps", "aa"])?.ok()?;
        ensure!(
            ps.stdout.contains("10.35.4.1/24") && !ps.stdout.contains("10.35.4.9"),
            "{ps}"
        );
        let bridge = h.run("ip", ["-4", "addr", "show", "weave"])?.ok()?;
        ensure!(!bridge.stdout.contains("10.35.4.254"), "{bridge}");
        ensure!(!h
            .run("ip", ["link", "show", &format!("vethwepl{own_pid}")])?
            .success());

        // A member of the docker group may, through the CLI.
        let member = format!("--groups={group}");
        let as_member = |args: &[&str]| -> Result<Out> {
            h.cmd("setpriv")
                .args(["--reuid=65534", "--regid=65534", &member, &weave])
                .args(args)
                .ok()
        };
        as_member(&["expose", "10.35.4.254/24"])?;
        let bridge = h.run("ip", ["-4", "addr", "show", "weave"])?.ok()?;
        ensure!(bridge.stdout.contains("10.35.4.254/24"), "{bridge}");
        as_member(&["hide", "10.35.4.254/24"])?;
        as_member(&["attach", "10.35.4.9/24", "aa"])?;
        let ps = h.weave(["ps", "aa"])?.ok()?;
        ensure!(ps.stdout.contains("10.35.4.9/24"), "{ps}");
        as_member(&["detach", "10.35.4.9/24", "aa"])?;
        as_member(&["connect", "127.0.0.1:7"])?;
        let targets = h.weave(["status", "targets"])?.ok()?;
        ensure!(targets.stdout.contains("127.0.0.1:7"), "{targets}");
        as_member(&["forget", "127.0.0.1:7"])?;
        Ok(())
    })
}

#[test]
fn host_protections_are_installed_and_reset_removes_them() -> Result<()> {
    let host = Host::new()?;
    host.scenario(|h| {
        h.weave(["launch"])?.ok()?;
        let docker0 = h.sh("ip -4 -o addr show docker0 | awk '{print $4}' | cut -d/ -f1")?.ok()?;
        let docker0 = docker0.stdout_trim().to_string();
        ensure!(!docker0.is_empty(), "the host's dockerd should have docker0");
        let input = h.run("iptables", ["-S", "WEAVE-INPUT"])?.ok()?;
        for expected in [
            "-d 127.0.0.1/32 -p tcp -m tcp --dport 6784 -m addrtype ! --src-type LOCAL -m conntrack ! --ctstate RELATED,ESTABLISHED -m comment --comment \"Block non-local access to Weave Net control port\" -j DROP".to_string(),
            format!("-d {docker0}/32 -i docker0 -p tcp -m tcp --dport 6783 -j DROP"),
            format!("-d {docker0}/32 -i docker0 -p udp -m udp --dport 6783 -j DROP"),
            format!("-d {docker0}/32 -i docker0 -p udp -m udp --dport 6784 -j DROP"),
        ] {
            ensure!(input.stdout.contains(&expected), "missing {expected:?} in {input}");
        }
        let hooks = h.run("iptables", ["-S", "INPUT"])?.ok()?;
        ensure!(hooks.stdout.lines().nth(1) == Some("-A INPUT -j WEAVE-INPUT"), "WEAVE-INPUT must be first: {hooks}");
        let forward = h.run("iptables", ["-S", "FORWARD"])?.ok()?;
        ensure!(forward.stdout.lines().nth(1) == Some("-A FORWARD -i docker0 -o weave -j DROP"), "{forward}");

        // A container on docker0 cannot reach the mesh port on the docker0 address, while it
        // reaches another port there (the control: the probe works).
        let listener = h.cmd("busybox").args(["nc", "-l", "-p", "7070"]).spawn()?;
        let probe = format!(
            "nc -w 3 {docker0} 7070 </dev/null && echo open7070; nc -w 3 {docker0} 6783 </dev/null && echo open6783; echo done"
        );
        let out = h.docker(["run", "--rm", "busybox", "sh", "-c", &probe])?.ok()?;
        ensure!(out.stdout.contains("done"), "probe did not run: {out}");
        ensure!(out.stdout.contains("open7070"), "control port should be reachable from docker0: {out}");
        ensure!(!out.stdout.contains("open6783"), "mesh port must not be reachable from docker0: {out}");
        drop(listener.stop());

        h.weave(["reset"])?.ok()?;
        let input = h.run("iptables", ["-S", "INPUT"])?.ok()?;
        ensure!(!input.stdout.contains("WEAVE"), "{input}");
        ensure!(!h.run("iptables", ["-S", "WEAVE-INPUT"])?.success());
        let forward = h.run("iptables", ["-S", "FORWARD"])?.ok()?;
        ensure!(!forward.stdout.contains("weave"), "{forward}");
        Ok(())
    })
}
