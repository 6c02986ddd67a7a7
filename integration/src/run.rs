//! The per-run state: a run id, the run directory `$WEAVE_TEST_DIR/<id>` (default
//! `/var/tmp/weave-integ/<id>`) with an `owner` file, and the crash-safety sweep.
//!
//! Every name a run creates starts with `wv<id>` (`id` = 4 hex digits): hosts `wv<id>h<n>` (netns,
//! cgroup parent, hostname, directory), underlays `wv<id>u<n>`. The run directory lives as long as
//! some host or underlay of this process does ([`acquire`] hands out `Arc`s; the last drop removes
//! it). Before the first one, [`sweep`] removes what earlier runs left behind, but only names with
//! this prefix whose owning process (PID and start time from `owner`) is gone.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once, Weak};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};

use crate::image;
use crate::sys;

/// Environment variable naming the directory under which runs keep their files.
pub const TEST_DIR_ENV: &str = "WEAVE_TEST_DIR";
const DEFAULT_TEST_DIR: &str = "/var/tmp/weave-integ";
const OWNER_FILE: &str = "owner";
/// A run directory without an owner file younger than this is being set up, not abandoned.
const OWNERLESS_GRACE: Duration = Duration::from_secs(600);

static CURRENT: Mutex<Weak<RunDir>> = Mutex::new(Weak::new());
static SWEEP: Once = Once::new();
static NEXT_NAME: AtomicUsize = AtomicUsize::new(1);

/// The directory under which runs keep their files.
pub fn base_dir() -> PathBuf {
    std::env::var_os(TEST_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_TEST_DIR))
}

/// One run's directory and id; removed when the last `Arc` drops.
pub struct RunDir {
    id: String,
    dir: PathBuf,
    /// Built once, by whichever host needs it first (the others wait on the lock).
    busybox_tar: Mutex<Option<PathBuf>>,
}

impl RunDir {
    /// The 4-hex-digit run id.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A fresh name `wv<id><kind><n>`, unique within this process (≤ 15 chars for n < 10^8).
    pub(crate) fn fresh_name(&self, kind: char) -> String {
        format!(
            "wv{}{kind}{}",
            self.id,
            NEXT_NAME.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// The docker client configuration directory for this run (`DOCKER_CONFIG`), so a developer's
    /// `~/.docker` settings (credential helpers, contexts) stay out of the tests.
    pub(crate) fn docker_config(&self) -> PathBuf {
        self.dir.join("docker-config")
    }

    /// The busybox image tarball, built on first use (see [`crate::image`]).
    pub fn busybox_tar(&self) -> Result<PathBuf> {
        let mut built = self
            .busybox_tar
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(path) = built.as_ref() {
            return Ok(path.clone());
        }
        let path = self.dir.join("busybox.tar");
        image::write_busybox_tar(&path)?;
        *built = Some(path.clone());
        Ok(path)
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_dir_all(&self.dir) {
            eprintln!(
                "weave-integration: cannot remove {}: {err}",
                self.dir.display()
            );
        }
    }
}

/// The current run directory, created (after a sweep of earlier runs' leftovers) if none is alive.
pub fn acquire() -> Result<Arc<RunDir>> {
    let mut current = CURRENT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(run) = current.upgrade() {
        return Ok(run);
    }
    SWEEP.call_once(sweep);
    let run = Arc::new(create_run_dir()?);
    *current = Arc::downgrade(&run);
    Ok(run)
}

fn create_run_dir() -> Result<RunDir> {
    let base = base_dir();
    std::fs::create_dir_all(&base)
        .with_context(|| format!("cannot create the test directory {}", base.display()))?;
    let taken: HashSet<String> = sys::netns_list()
        .iter()
        .filter_map(|n| parse_name(n).map(|(id, _, _)| id.to_string()))
        .collect();
    let mut seed = seed();
    for _ in 0..64 {
        seed = splitmix(seed);
        let id = format!("{:04x}", seed & 0xffff);
        if taken.contains(&id) {
            continue;
        }
        let dir = base.join(&id);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("cannot create {}", dir.display()));
            }
        }
        let me = std::process::id();
        let started = sys::start_time(me).unwrap_or(0);
        std::fs::write(dir.join(OWNER_FILE), format!("{me} {started}\n"))
            .with_context(|| format!("cannot write {}", dir.join(OWNER_FILE).display()))?;
        let run = RunDir {
            id,
            dir,
            busybox_tar: Mutex::new(None),
        };
        std::fs::create_dir_all(run.docker_config())?;
        return Ok(run);
    }
    bail!("no free run id under {}", base.display())
}

fn seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 32)
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Splits a harness name `wv<4 hex><h|u><digits>` into (run id, kind, number).
pub(crate) fn parse_name(name: &str) -> Option<(&str, char, u64)> {
    let rest = name.strip_prefix("wv")?;
    let id = rest.get(..4)?;
    if !id
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let kind = rest[4..].chars().next()?;
    if kind != 'h' && kind != 'u' {
        return None;
    }
    let digits = &rest[5..];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((id, kind, digits.parse().ok()?))
}

/// Whether the run that owns `dir` may still be alive.
fn run_alive(dir: &Path) -> bool {
    match std::fs::read_to_string(dir.join(OWNER_FILE)) {
        Ok(owner) => {
            let mut fields = owner.split_whitespace().map(|f| f.parse::<u64>().ok());
            match (fields.next().flatten(), fields.next().flatten()) {
                (Some(pid), Some(started)) => u32::try_from(pid)
                    .ok()
                    .and_then(sys::start_time)
                    .is_some_and(|t| started == 0 || t == started),
                _ => false,
            }
        }
        Err(_) => std::fs::metadata(dir)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age < OWNERLESS_GRACE),
    }
}

/// Removes leftovers of dead runs: their network namespaces (and every process in them), their
/// cgroups (and every process in them), their directories.
pub fn sweep() {
    let base = base_dir();
    let mut live = HashSet::new();
    let mut dead_dirs = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&base) {
        for entry in entries.filter_map(|e| e.ok()) {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name.len() != 4 || parse_name(&format!("wv{name}h0")).is_none() {
                continue;
            }
            if run_alive(&entry.path()) {
                live.insert(name);
            } else {
                dead_dirs.push((name, entry.path()));
            }
        }
    }
    let dead = |name: &str| parse_name(name).is_some_and(|(id, _, _)| !live.contains(id));

    for netns in sys::netns_list().into_iter().filter(|n| dead(n)) {
        eprintln!("weave-integration: sweeping network namespace {netns} of a dead run");
        sys::kill_netns_processes(&netns, Duration::from_secs(10));
        if let Err(err) = sys::run_quiet("ip", &["netns", "del", &netns]) {
            eprintln!("weave-integration: {err}");
        }
    }
    for cgroup in cgroup_names().into_iter().filter(|n| dead(n)) {
        eprintln!("weave-integration: sweeping cgroup {cgroup} of a dead run");
        if !sys::remove_cgroups(&cgroup, Duration::from_secs(10)) {
            eprintln!("weave-integration: cgroup {cgroup} is still busy");
        }
    }
    for (_, dir) in dead_dirs {
        eprintln!(
            "weave-integration: sweeping {} of a dead run",
            dir.display()
        );
        if let Err(err) = std::fs::remove_dir_all(&dir) {
            eprintln!("weave-integration: cannot remove {}: {err}", dir.display());
        }
    }
}

/// Names of the cgroups directly under the cgroup root or one of its hierarchies that look like
/// harness host names.
fn cgroup_names() -> HashSet<String> {
    let mut names = HashSet::new();
    let root = Path::new("/sys/fs/cgroup");
    let mut dirs = vec![root.to_path_buf()];
    if let Ok(entries) = std::fs::read_dir(root) {
        dirs.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()));
    }
    for dir in dirs {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.filter_map(|e| e.ok()) {
                if let Ok(name) = entry.file_name().into_string() {
                    if parse_name(&name).is_some() {
                        names.insert(name);
                    }
                }
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse() {
        assert_eq!(parse_name("wv1a2bh3"), Some(("1a2b", 'h', 3)));
        assert_eq!(parse_name("wv00ffu12"), Some(("00ff", 'u', 12)));
        assert_eq!(parse_name("wvp1"), None);
        assert_eq!(parse_name("wv1A2Bh3"), None);
        assert_eq!(parse_name("wv1a2bx3"), None);
        assert_eq!(parse_name("wv1a2bh"), None);
        assert_eq!(parse_name("wv1a2bh3x"), None);
        assert_eq!(parse_name("docker"), None);
    }

    #[test]
    fn splitmix_spreads_ids() {
        let ids: HashSet<u64> = (0..1000u64).map(|i| splitmix(i) & 0xffff).collect();
        assert!(ids.len() > 980);
    }
}
