//! Processes, network namespaces and cgroups seen from the root namespaces: signals by PID, the
//! processes of a netns (`ip netns pids`) and of a cgroup tree. Used by teardown and the sweep.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Sends `sig` to `pid`; false when there is no such process.
pub(crate) fn signal(pid: u32, sig: Signal) -> bool {
    i32::try_from(pid).is_ok_and(|p| kill(Pid::from_raw(p), sig).is_ok())
}

/// Sends `sig` to the process group `pgid`.
pub(crate) fn signal_group(pgid: u32, sig: Signal) -> bool {
    i32::try_from(pgid).is_ok_and(|p| killpg(Pid::from_raw(p), sig).is_ok())
}

/// The start time (clock ticks after boot) of `pid`, field 22 of /proc/PID/stat; `None` when the
/// process is gone or a zombie. Together with the PID it names a process for good.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command, which is in parentheses and may contain anything.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    // `state` was field 3; the start time is field 22.
    fields.nth(18)?.parse().ok()
}

/// Runs a root-namespace helper (ip, ...) and returns its stdout, or its stderr as the error.
pub(crate) fn run_quiet(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Names of the network namespaces in /run/netns.
pub(crate) fn netns_list() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// PIDs of the processes whose network namespace is `netns`.
pub(crate) fn netns_pids(netns: &str) -> Vec<u32> {
    run_quiet("ip", &["netns", "pids", netns])
        .map(|out| {
            out.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// SIGKILLs every process in `netns` until none is left (or `within` passes); true when empty.
pub(crate) fn kill_netns_processes(netns: &str, within: Duration) -> bool {
    let start = Instant::now();
    loop {
        let pids = netns_pids(netns);
        if pids.is_empty() {
            return true;
        }
        if start.elapsed() >= within {
            return false;
        }
        for pid in pids {
            signal(pid, Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The directories named `name` directly under the cgroup root (cgroup v2) or under one of its
/// hierarchies (v1: /sys/fs/cgroup/<controller>/<name>). dockerd's `--cgroup-parent` puts every
/// container of a test host below them.
pub(crate) fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let root = Path::new(CGROUP_ROOT);
    if root.join(name).is_dir() {
        found.push(root.join(name));
    }
    if let Ok(dir) = std::fs::read_dir(root) {
        for entry in dir.filter_map(|e| e.ok()) {
            let candidate = entry.path().join(name);
            if candidate.is_dir() {
                found.push(candidate);
            }
        }
    }
    found
}

/// Every directory of the cgroup trees below `tops`, deepest first.
fn cgroup_tree(tops: &[PathBuf]) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.filter_map(|e| e.ok()) {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&entry.path(), out);
                }
            }
        }
        out.push(dir.to_path_buf());
    }
    let mut out = Vec::new();
    for top in tops {
        walk(top, &mut out);
    }
    out
}

/// PIDs in the cgroup trees named `name`.
pub(crate) fn cgroup_pids(name: &str) -> Vec<u32> {
    let mut pids: Vec<u32> = cgroup_tree(&cgroup_dirs(name))
        .iter()
        .filter_map(|dir| std::fs::read_to_string(dir.join("cgroup.procs")).ok())
        .flat_map(|procs| {
            procs
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// SIGKILLs every process in the cgroup trees named `name`; returns how many were signalled.
pub(crate) fn kill_cgroup_processes(name: &str) -> usize {
    cgroup_pids(name)
        .into_iter()
        .filter(|pid| signal(*pid, Signal::SIGKILL))
        .count()
}

/// Removes the (empty) cgroup trees named `name`, retrying while their processes die; true when
/// none is left.
pub(crate) fn remove_cgroups(name: &str, within: Duration) -> bool {
    let start = Instant::now();
    loop {
        kill_cgroup_processes(name);
        for dir in cgroup_tree(&cgroup_dirs(name)) {
            let _ = std::fs::remove_dir(&dir);
        }
        if cgroup_dirs(name).is_empty() {
            return true;
        }
        if start.elapsed() >= within {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_is_known_and_stable() {
        let me = std::process::id();
        let first = start_time(me);
        assert!(first.is_some());
        assert_eq!(first, start_time(me));
    }

    #[test]
    fn no_start_time_for_a_missing_process() {
        // PIDs are below 2^22 on Linux.
        assert_eq!(start_time(u32::MAX - 1), None);
    }
}
