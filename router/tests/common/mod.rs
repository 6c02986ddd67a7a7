//! Helpers for the root-only tests: a throw-away network namespace per test (entered by a
//! dedicated thread with `unshare(CLONE_NEWNET)`, so it vanishes with the thread and never
//! touches the root namespace's links), fake containers (`sleep` in a fresh netns), and command
//! runners.

#![allow(dead_code)]

use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sched::{unshare, CloneFlags};

/// Run `test` on a fresh thread inside a fresh network namespace (with `lo` up), on a
/// current-thread runtime built after the switch. Panics in `test` propagate.
pub fn in_new_netns<F, Fut>(test: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let thread = std::thread::spawn(move || {
        unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET): tests must run as root");
        sh("ip", &["link", "set", "lo", "up"]);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        runtime.block_on(test());
    });
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

/// Poll `cond` every 10 ms until it holds or `what` times out after 10 s.
pub fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn netns_inode(path: &str) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// A `sleep` process standing in for a container; killed (by PID) on drop.
pub struct FakeContainer {
    child: Child,
}

impl FakeContainer {
    /// In a network namespace of its own (like a container).
    pub fn isolated() -> Self {
        let child = Command::new("unshare")
            .args(["--net", "sleep", "300"])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn unshare --net sleep");
        let me = FakeContainer { child };
        let ours = netns_inode("/proc/thread-self/ns/net");
        let pid = me.pid();
        eventually("the fake container to enter its own netns", || {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            comm.trim() == "sleep" && netns_inode(&format!("/proc/{pid}/ns/net")) != ours
        });
        me
    }

    /// Sharing the caller's network namespace (like `--net=host`).
    pub fn in_our_netns() -> Self {
        let child = Command::new("sleep")
            .arg("300")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sleep");
        FakeContainer { child }
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits i32")
    }

    /// Run a command inside this container's network namespace; stdout, panics on failure.
    pub fn run(&self, program: &str, args: &[&str]) -> String {
        let ns = format!("--net=/proc/{}/ns/net", self.pid());
        let mut all = vec![ns.as_str(), program];
        all.extend_from_slice(args);
        sh("nsenter", &all)
    }

    /// Like [`FakeContainer::run`] but reports success instead of panicking.
    pub fn try_run(&self, program: &str, args: &[&str]) -> bool {
        let ns = format!("--net=/proc/{}/ns/net", self.pid());
        Command::new("nsenter")
            .arg(ns)
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }
}

impl Drop for FakeContainer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run a command in the calling thread's netns; stdout, panics with stderr on failure.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Does the calling thread's netns have a link called `name`?
pub fn link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", "dev", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// `tx-checksumming: on|off` from `ethtool -k` output.
pub fn tx_checksumming(ethtool_k: &str) -> bool {
    let line = ethtool_k
        .lines()
        .find(|l| l.starts_with("tx-checksumming:"))
        .unwrap_or_else(|| panic!("no tx-checksumming line in {ethtool_k}"));
    line.contains(" on")
}
