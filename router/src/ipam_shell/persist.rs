//! IPAM's state file on the host (`/var/lib/weave/ipam.json`, bind-mounted into the router's
//! container): whatever the allocator hands the shell to persist, written whole each time to a
//! temporary file that is then renamed over the old one, so a crash leaves the old state or the
//! new one, never half of either. Mode 0600: it names every container and its addresses.
//! `weave reset` removes it.

use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Where `weave launch` keeps IPAM's state (the router sees the same path).
pub const STATE_FILE: &str = "/var/lib/weave/ipam.json";
/// A state file larger than this is not ours (a million addresses' records fit well inside).
pub const MAX_STATE_BYTES: u64 = 256 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn temp_path(&self) -> PathBuf {
        let mut name = self
            .path
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        name.push(".tmp");
        self.path.with_file_name(name)
    }

    /// The last state stored; `None` when there is none yet.
    pub fn load(&self) -> io::Result<Option<Vec<u8>>> {
        let file = match std::fs::File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut bytes = Vec::new();
        file.take(MAX_STATE_BYTES + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 > MAX_STATE_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("larger than {MAX_STATE_BYTES} bytes"),
            ));
        }
        Ok(Some(bytes))
    }

    /// Replace the state atomically (temp file, fsync, rename, fsync of the directory).
    pub fn store(&self, bytes: &[u8]) -> io::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let temp = self.temp_path();
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&temp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            // The rename itself must survive a power cut too; not every filesystem lets a
            // directory be opened for that, which is not worth failing over.
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    /// `weave reset`: forget everything (absent already is fine).
    pub fn remove(&self) -> io::Result<()> {
        for path in [self.path.clone(), self.temp_path()] {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn scratch() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "weave-ipam-state-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn stores_loads_replaces_and_removes() {
        let dir = scratch();
        let file = StateFile::new(dir.join("sub").join("ipam.json"));
        assert_eq!(file.load().expect("load"), None);
        file.store(b"{\"v\":1}").expect("store");
        assert_eq!(
            file.load().expect("load").as_deref(),
            Some(&b"{\"v\":1}"[..])
        );
        let mode = std::fs::metadata(file.path())
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        file.store(b"{\"v\":2}").expect("store again");
        assert_eq!(
            file.load().expect("load").as_deref(),
            Some(&b"{\"v\":2}"[..])
        );
        assert!(!file.temp_path().exists(), "the temp file is renamed away");
        file.remove().expect("remove");
        assert_eq!(file.load().expect("load"), None);
        file.remove().expect("remove twice");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
