//! A test host: a network namespace, a mount namespace and a UTS namespace of its own, with its
//! own dockerd. Commands run inside it through `nsenter --target <holder> -m -n -u`.
//!
//! The namespaces are held by a "holder" process (`sleep infinity`) that set up the mount
//! namespace first: a tmpfs on /run (so /var/run/docker.sock, /var/run/weave and containerd's state
//! are the host's own), a sysfs of the host's netns on /sys (so /sys/class/net shows the host's
//! interfaces; the cgroup mounts are moved over from the old /sys), and bind mounts of per-host
//! directories on /var/lib/docker, /var/lib/weave and /etc/docker. Processes reach the host's files from outside through
//! `/proc/<holder>/root/...` ([`Host::path_in`]). dockerd runs with `--cgroup-parent <name>`, so
//! every container of the host is in a cgroup named after it.
//!
//! Teardown (on drop, also when a test fails): SIGTERM dockerd while SIGKILLing the host's
//! containers (by cgroup), SIGKILL dockerd if it is not gone in 15 s, SIGKILL whatever is left in
//! the netns (containerd, shims, the holder: all ours), remove the cgroups, `ip netns del`, and
//! remove the host's directory. The mount namespace disappears with its last process.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::Signal;

use crate::exec::{tail, Cmd, Out};
use crate::image::{self, BUSYBOX_CHANGES, BUSYBOX_IMAGE};
use crate::run::{self, RunDir};
use crate::sys;
use crate::wait::{eventually, patience, GiveUp};

/// Environment variable with the `weave` binary the tests drive.
pub const WEAVE_BIN_ENV: &str = "WEAVE_BIN";
/// `DOCKER_HOST` of the weave proxy, as `weave env` prints it.
pub const PROXY_DOCKER_HOST: &str = "unix:///var/run/weave/weave.sock";
/// The host's dockerd socket, inside the host.
pub const DOCKER_SOCKET: &str = "/run/docker.sock";
/// The weave proxy socket, inside the host.
pub const PROXY_SOCKET: &str = "/run/weave/weave.sock";

const HOST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Variables of the test process that would point a client somewhere else than intended.
const SCRUBBED_ENV: [&str; 9] = [
    "DOCKER_HOST",
    "DOCKER_CONTEXT",
    "DOCKER_TLS_VERIFY",
    "DOCKER_CERT_PATH",
    "DOCKER_API_VERSION",
    "ORIG_DOCKER_HOST",
    "WEAVE_PASSWORD",
    "WEAVE_MTU",
    "WEAVE_HTTP_ADDR",
];
const DOCKERD_STOP_GRACE: Duration = Duration::from_secs(15);

/// The `weave` binary: `$WEAVE_BIN`, else `weave` next to the test executable's profile directory
/// (`target/<profile>/weave`), else `<workspace>/target/release/weave`.
pub fn weave_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os(WEAVE_BIN_ENV).filter(|v| !v.is_empty()) {
        // Commands run from other directories (nsenter, docker): a relative path would break.
        let bin = PathBuf::from(bin);
        return std::path::absolute(&bin).unwrap_or(bin);
    }
    let beside = std::env::current_exe().ok().and_then(|exe| {
        // target/<profile>/deps/<test>-<hash> or target/<profile>/<bin>
        let dir = exe.parent()?;
        let profile = if dir.file_name()? == "deps" {
            dir.parent()?
        } else {
            dir
        };
        Some(profile.join("weave"))
    });
    match beside {
        Some(bin) if bin.is_file() => bin,
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/weave"),
    }
}

/// A docker command-line client installed on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DockerClient {
    /// `/usr/bin/docker`: Debian's docker.io (20.10).
    Debian,
    /// `/usr/local/bin/docker`: a newer upstream client (28.x), where one is installed.
    Local,
}

impl DockerClient {
    pub const ALL: [DockerClient; 2] = [DockerClient::Debian, DockerClient::Local];

    pub fn path(self) -> &'static Path {
        Path::new(match self {
            DockerClient::Debian => "/usr/bin/docker",
            DockerClient::Local => "/usr/local/bin/docker",
        })
    }

    /// A short name for messages and container names.
    pub fn label(self) -> &'static str {
        match self {
            DockerClient::Debian => "debian",
            DockerClient::Local => "local",
        }
    }

    pub fn is_present(self) -> bool {
        self.path().is_file()
    }

    /// The clients present on this machine (Debian's first).
    pub fn available() -> Vec<DockerClient> {
        DockerClient::ALL
            .into_iter()
            .filter(|c| c.is_present())
            .collect()
    }

    /// The clients a "with every docker client" test runs, printed for the run's output. With
    /// `CI=true` fewer than two is an error: a missing 28.x CLI must not drop out silently.
    pub fn every(test: &str) -> Result<Vec<DockerClient>> {
        let clients = DockerClient::available();
        let names: Vec<String> = clients
            .iter()
            .map(|c| format!("{} ({})", c.label(), c.path().display()))
            .collect();
        eprintln!("{test}: docker clients exercised: {}", names.join(", "));
        let missing: Vec<String> = DockerClient::ALL
            .into_iter()
            .filter(|c| !clients.contains(c))
            .map(|c| c.path().display().to_string())
            .collect();
        if !enough_clients(clients.len(), in_ci()) {
            bail!(
                "{test}: {} docker client(s) to exercise, missing {}; CI needs both",
                clients.len(),
                missing.join(", ")
            );
        }
        Ok(clients)
    }

    /// The client the harness itself uses: the first available one.
    pub fn primary() -> Result<DockerClient> {
        DockerClient::available()
            .first()
            .copied()
            .ok_or_else(|| anyhow!("no docker client: install docker.io (/usr/bin/docker)"))
    }
}

/// Which docker API a docker client talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// The host's dockerd (`/var/run/docker.sock`).
    Dockerd,
    /// The weave proxy (`DOCKER_HOST=unix:///var/run/weave/weave.sock`).
    Proxy,
}

/// A simulated machine: own netns, mount ns, hostname and dockerd. See the module docs.
pub struct Host {
    name: String,
    dir: PathBuf,
    run: Arc<RunDir>,
    holder: Option<Child>,
    dockerd: Option<Child>,
    underlay_addr: OnceLock<Ipv4Addr>,
    netns_created: bool,
    torn_down: bool,
}

impl Host {
    /// Creates and starts a host with busybox imported; tears down what it made if that fails.
    pub fn new() -> Result<Host> {
        let run = run::acquire()?;
        let name = run.fresh_name('h');
        Host::named(run, name)
    }

    /// Starts a host with a name from [`RunDir::fresh_name`].
    pub(crate) fn named(run: Arc<RunDir>, name: String) -> Result<Host> {
        let dir = run.dir().join(&name);
        let mut host = Host {
            name,
            dir,
            run,
            holder: None,
            dockerd: None,
            underlay_addr: OnceLock::new(),
            netns_created: false,
            torn_down: false,
        };
        host.start()
            .with_context(|| format!("starting test host {}", host.name))?;
        Ok(host)
    }

    fn start(&mut self) -> Result<()> {
        let t0 = Instant::now();
        for sub in ["docker", "weave", "etc-docker"] {
            std::fs::create_dir_all(self.dir.join(sub))
                .with_context(|| format!("cannot create {}/{sub}", self.dir.display()))?;
        }
        // Mount points must exist in the root file system.
        for mount_point in ["/var/lib/docker", "/var/lib/weave", "/etc/docker"] {
            std::fs::create_dir_all(mount_point)
                .with_context(|| format!("cannot create mount point {mount_point}"))?;
        }
        sys::run_quiet("ip", &["netns", "add", &self.name]).map_err(|e| anyhow!(e))?;
        self.netns_created = true;
        sys::run_quiet("ip", &["-n", &self.name, "link", "set", "lo", "up"])
            .map_err(|e| anyhow!(e))?;
        self.start_holder()?;
        self.start_dockerd()?;
        let tar = self.run.busybox_tar()?;
        let mut import = self
            .docker_cmd(DockerClient::primary()?, Via::Dockerd)
            .arg("import");
        for change in BUSYBOX_CHANGES {
            import = import.args(["--change", change]);
        }
        import
            .arg(&tar)
            .arg(BUSYBOX_IMAGE)
            .ok()
            .context("importing busybox")?;
        log(&format!(
            "host {} up in {:.2}s",
            self.name,
            t0.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    fn start_holder(&mut self) -> Result<()> {
        let q = |sub: &str| shell_quote(&self.dir.join(sub).to_string_lossy());
        let script = format!(
            "set -e\n\
             mount -t tmpfs -o mode=755 tmpfs /run\n\
             mkdir -p /run/weave /run/lock /run/.wv-cgroup\n\
             mount --rbind /sys/fs/cgroup /run/.wv-cgroup\n\
             mount -t sysfs sysfs /sys\n\
             mount --move /run/.wv-cgroup /sys/fs/cgroup\n\
             rmdir /run/.wv-cgroup\n\
             mount --bind {docker} /var/lib/docker\n\
             mount --bind {weave} /var/lib/weave\n\
             mount --bind {etc} /etc/docker\n\
             hostname {name}\n\
             echo ready\n\
             exec sleep infinity\n",
            docker = q("docker"),
            weave = q("weave"),
            etc = q("etc-docker"),
            name = self.name,
        );
        let log_file = std::fs::File::create(self.dir.join("holder.log"))?;
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.name))
            .args([
                "--",
                "unshare",
                "--mount",
                "--uts",
                "--propagation",
                "private",
            ])
            .args(["--", "sh", "-c", &script])
            .env("PATH", HOST_PATH)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .context("cannot start the namespace holder (nsenter, unshare)")?;
        let stdout = child.stdout.take();
        self.holder = Some(child);
        let mut line = String::new();
        if let Some(stdout) = stdout {
            BufReader::new(stdout).read_line(&mut line)?;
        }
        if line.trim() != "ready" {
            bail!(
                "the namespace holder failed: {}",
                std::fs::read_to_string(self.dir.join("holder.log")).unwrap_or_default()
            );
        }
        Ok(())
    }

    fn holder_pid(&self) -> u32 {
        self.holder.as_ref().map(Child::id).unwrap_or(0)
    }

    fn start_dockerd(&mut self) -> Result<()> {
        let log_path = self.dir.join("dockerd.log");
        let log_file = std::fs::File::create(&log_path)?;
        let child = Command::new("nsenter")
            .args(self.nsenter_args())
            .args([
                "dockerd",
                "--host",
                &format!("unix://{DOCKER_SOCKET}"),
                "--cgroup-parent",
                &self.name,
                "--exec-opt",
                "native.cgroupdriver=cgroupfs",
                "--data-root",
                "/var/lib/docker",
                "--exec-root",
                "/run/docker",
                "--pidfile",
                "/run/docker.pid",
            ])
            .env("PATH", HOST_PATH)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context("cannot start dockerd")?;
        self.dockerd = Some(child);
        let socket = self.path_in(DOCKER_SOCKET);
        let dockerd = &mut self.dockerd;
        eventually(
            &format!("dockerd of {} to answer", self.name),
            patience(),
            || {
                if let Some(Ok(Some(status))) = dockerd.as_mut().map(Child::try_wait) {
                    return Err(GiveUp(format!(
                        "dockerd exited ({status}); log:\n{}",
                        tail(
                            &std::fs::read_to_string(&log_path).unwrap_or_default(),
                            3000
                        )
                    ))
                    .into());
                }
                docker_ping(&socket)
            },
        )
    }

    /// nsenter arguments that enter this host, ending with `--`.
    fn nsenter_args(&self) -> Vec<OsString> {
        vec![
            "--target".into(),
            self.holder_pid().to_string().into(),
            "--mount".into(),
            "--net".into(),
            "--uts".into(),
            "--".into(),
        ]
    }

    /// The host's name: netns, cgroup parent, hostname and directory name (`wv<run><h><n>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host's directory (in the root mount namespace; also visible inside the host).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// PID of dockerd, while it runs.
    pub fn dockerd_pid(&self) -> Option<u32> {
        self.dockerd.as_ref().map(Child::id)
    }

    /// PID of the process holding the host's namespaces.
    pub fn namespace_pid(&self) -> u32 {
        self.holder_pid()
    }

    /// The host's address on the underlay (192.0.2.x), once it is on one.
    pub fn underlay_addr(&self) -> Option<Ipv4Addr> {
        self.underlay_addr.get().copied()
    }

    pub(crate) fn set_underlay_addr(&self, addr: Ipv4Addr) -> Result<()> {
        self.underlay_addr
            .set(addr)
            .map_err(|old| anyhow!("{} is already on an underlay as {old}", self.name))
    }

    /// A path inside the host, as seen from the test process (`/proc/<holder>/root/<path>`).
    pub fn path_in(&self, path: impl AsRef<Path>) -> PathBuf {
        let path = path.as_ref();
        let relative = path.strip_prefix("/").unwrap_or(path);
        PathBuf::from(format!("/proc/{}/root", self.holder_pid())).join(relative)
    }

    /// The host's dockerd socket, reachable from the test process.
    pub fn docker_socket(&self) -> PathBuf {
        self.path_in(DOCKER_SOCKET)
    }

    /// The weave proxy socket, reachable from the test process.
    pub fn proxy_socket(&self) -> PathBuf {
        self.path_in(PROXY_SOCKET)
    }

    /// A command to run inside the host (netns, mount ns, hostname), with a clean environment:
    /// no `DOCKER_HOST` and friends, `DOCKER_CONFIG` of this run, a PATH with the sbin dirs.
    pub fn cmd(&self, program: impl AsRef<OsStr>) -> Cmd {
        let mut prefix: Vec<OsString> = vec!["nsenter".into()];
        prefix.extend(self.nsenter_args());
        let mut cmd = Cmd::wrapped(&self.name, prefix, program);
        for var in SCRUBBED_ENV {
            cmd = cmd.env_remove(var);
        }
        cmd.env("PATH", HOST_PATH)
            .env("DOCKER_CONFIG", self.run.docker_config())
            .env("DOCKER_CLI_HINTS", "false")
            .envs_are_defaults()
    }

    /// Runs `program args` inside the host.
    pub fn run<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<Out>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.cmd(program).args(args).run()
    }

    /// Runs `program args` inside the host with extra environment variables.
    pub fn run_env<I, S>(
        &self,
        program: impl AsRef<OsStr>,
        args: I,
        envs: &[(&str, &str)],
    ) -> Result<Out>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.cmd(program)
            .args(args)
            .envs(envs.iter().copied())
            .run()
    }

    /// Runs a shell script inside the host.
    pub fn sh(&self, script: &str) -> Result<Out> {
        self.cmd("sh").args(["-c", script]).run()
    }

    /// The weave CLI ([`weave_bin`]) inside the host.
    pub fn weave_cmd(&self) -> Cmd {
        self.cmd(weave_bin())
    }

    /// Runs `weave args` inside the host (no `DOCKER_HOST`).
    pub fn weave<I, S>(&self, args: I) -> Result<Out>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let bin = weave_bin();
        if !bin.is_file() {
            bail!(
                "weave binary {} not found: run `cargo build --release` or set {WEAVE_BIN_ENV}",
                bin.display()
            );
        }
        self.cmd(bin).args(args).run()
    }

    /// A docker client command inside the host, talking to dockerd or the proxy.
    pub fn docker_cmd(&self, client: DockerClient, via: Via) -> Cmd {
        let cmd = self.cmd(client.path());
        match via {
            Via::Dockerd => cmd,
            Via::Proxy => cmd.env("DOCKER_HOST", PROXY_DOCKER_HOST),
        }
    }

    /// `docker args` with the primary client, straight to the host's dockerd.
    pub fn docker<I, S>(&self, args: I) -> Result<Out>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.docker_with(DockerClient::primary()?, args)
    }

    /// `docker args` with the given client, straight to the host's dockerd.
    pub fn docker_with<I, S>(&self, client: DockerClient, args: I) -> Result<Out>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.docker_cmd(client, Via::Dockerd).args(args).run()
    }

    /// `docker args` with the primary client, through the weave proxy.
    pub fn docker_proxy<I, S>(&self, args: I) -> Result<Out>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.docker_proxy_with(DockerClient::primary()?, args)
    }

    /// `docker args` with the given client, through the weave proxy.
    pub fn docker_proxy_with<I, S>(&self, client: DockerClient, args: I) -> Result<Out>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.docker_cmd(client, Via::Proxy).args(args).run()
    }

    /// Starts a detached, long-running busybox container at `cidr` through the weave proxy.
    pub fn run_woven_sleeper(&self, name: &str, cidr: &str) -> Result<()> {
        let env = format!("WEAVE_CIDR={cidr}");
        self.docker_proxy([
            "run", "-d", "--name", name, "-e", &env, "busybox", "sleep", "100000",
        ])?
        .ok()
        .with_context(|| {
            format!(
                "docker run {name} ({cidr}) through the proxy of {}",
                self.name
            )
        })?;
        Ok(())
    }

    /// Writes a `docker build` context (a Dockerfile) in the host's directory; returns its path,
    /// valid inside the host too.
    pub fn build_context(&self, name: &str, dockerfile: &str) -> Result<PathBuf> {
        image::write_build_context(&self.dir.join("contexts").join(name), dockerfile)
    }

    /// Blocks all traffic between this host and `other` (iptables DROP both ways, in this host's
    /// netns). Both must be on an underlay.
    pub fn block(&self, other: &Host) -> Result<()> {
        self.block_rules(other, "-I")
    }

    /// Removes what [`Host::block`] added.
    pub fn unblock(&self, other: &Host) -> Result<()> {
        self.block_rules(other, "-D")
    }

    fn block_rules(&self, other: &Host, op: &str) -> Result<()> {
        let peer = other
            .underlay_addr()
            .ok_or_else(|| anyhow!("{} is on no underlay", other.name))?
            .to_string();
        for (chain, dir) in [("INPUT", "-s"), ("OUTPUT", "-d")] {
            self.cmd("iptables")
                .args(["-w", op, chain, dir, &peer])
                .args(["-m", "comment", "--comment", "weave-integration-block"])
                .args(["-j", "DROP"])
                .ok()?;
        }
        Ok(())
    }

    /// What helps to understand a failure: dockerd's log, containers, weave's logs, addresses.
    pub fn diagnostics(&self) -> String {
        let mut report = format!("===== diagnostics of test host {} =====\n", self.name);
        let log = std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
        let complaints: Vec<&str> = log
            .lines()
            .filter(|l| !l.contains("level=info") && !l.contains("level=debug"))
            .collect();
        let last = &complaints[complaints.len().saturating_sub(20)..];
        report.push_str(&format!(
            "--- dockerd.log: last warnings and errors ({}) ---\n{}\n",
            self.dir.join("dockerd.log").display(),
            last.join("\n")
        ));
        let quick = Duration::from_secs(20);
        let mut show = |title: &str, cmd: Cmd| {
            let text = match cmd.timeout(quick).run() {
                Ok(out) => format!("{}{}", out.stdout, out.stderr),
                Err(err) => format!("{err:#}"),
            };
            report.push_str(&format!("--- {title} ---\n{}\n", tail(&text, 4000)));
        };
        if let Ok(client) = DockerClient::primary() {
            show(
                "docker ps -a",
                self.docker_cmd(client, Via::Dockerd).args(["ps", "-a"]),
            );
            for container in ["weave", "weaveproxy"] {
                show(
                    &format!("docker logs {container}"),
                    self.docker_cmd(client, Via::Dockerd)
                        .args(["logs", "--tail", "60", container]),
                );
            }
        }
        show("ip addr", self.cmd("ip").args(["-br", "addr"]));
        report
    }

    /// Runs `scenario`; when it fails, prints [`Host::diagnostics`] (to stderr, which the test
    /// runner shows with the failure) before returning the error.
    pub fn scenario(&self, scenario: impl FnOnce(&Host) -> Result<()>) -> Result<()> {
        scenario(self).inspect_err(|_| eprintln!("{}", self.diagnostics()))
    }

    /// Stops and removes everything of the host now (also done on drop). Errors are logged.
    pub fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        let t0 = Instant::now();
        if let Some(mut dockerd) = self.dockerd.take() {
            sys::signal(dockerd.id(), Signal::SIGTERM);
            let deadline = Instant::now() + DOCKERD_STOP_GRACE;
            loop {
                // Containers (restarted ones too) die at once: dockerd need not wait for them.
                sys::kill_cgroup_processes(&self.name);
                match dockerd.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        log(&format!(
                            "dockerd of {} ignored SIGTERM for {DOCKERD_STOP_GRACE:?}; killing it",
                            self.name
                        ));
                        sys::signal(dockerd.id(), Signal::SIGKILL);
                        let _ = dockerd.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        if self.netns_created && !sys::kill_netns_processes(&self.name, Duration::from_secs(10)) {
            log(&format!("processes survive in netns {}", self.name));
        }
        if let Some(mut holder) = self.holder.take() {
            sys::signal(holder.id(), Signal::SIGKILL);
            let _ = holder.wait();
        }
        if !sys::remove_cgroups(&self.name, Duration::from_secs(10)) {
            log(&format!("cgroup {} is still busy", self.name));
        }
        if self.netns_created {
            if let Err(err) = sys::run_quiet("ip", &["netns", "del", &self.name]) {
                log(&err);
            }
        }
        if let Err(err) = std::fs::remove_dir_all(&self.dir) {
            if err.kind() != std::io::ErrorKind::NotFound {
                log(&format!("cannot remove {}: {err}", self.dir.display()));
            }
        }
        log(&format!(
            "host {} torn down in {:.2}s",
            self.name,
            t0.elapsed().as_secs_f64()
        ));
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.torn_down && self.dockerd.is_some() {
            eprintln!("{}", self.diagnostics());
        }
        self.teardown();
    }
}

pub(crate) fn log(message: &str) {
    eprintln!("weave-integration: {message}");
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// `GET /_ping` on a docker API unix socket; `Ok` when it answers `OK`.
pub fn docker_ping(socket: &Path) -> Result<()> {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    if reply.starts_with("HTTP/1.") && reply.contains(" 200 ") && reply.ends_with("OK") {
        Ok(())
    } else {
        Err(anyhow!("unexpected /_ping reply: {reply:?}"))
    }
}

/// Whether this is a CI run (`CI=true`, as CI services set it), where every client and tool
/// the tests can use must be there.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
}

/// At least one client to run, and under CI both: CI must exercise the old and the new CLI.
fn enough_clients(count: usize, ci: bool) -> bool {
    count >= if ci { 2 } else { 1 }
}

#[cfg(test)]
mod client_tests {
    use super::enough_clients;

    #[test]
    fn ci_needs_two_clients() {
        assert!(!enough_clients(0, false));
        assert!(enough_clients(1, false));
        assert!(!enough_clients(1, true));
        assert!(enough_clients(2, true));
    }
}
