//! The static weavewait entrypoint (package `weavewait`, built by build.rs), embedded so the
//! `weave` binary can install it on the host for the proxy to bind-mount at `/w`.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The static weavewait executable.
pub const WEAVEWAIT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/weavewait"));

/// Each variant's subdirectory and the marker file that selects its mode (spec §3.6).
const VARIANTS: [(&str, Option<&str>); 3] = [
    ("w", None),
    ("w-nomcast", Some("nomcast")),
    ("w-noop", Some("noop")),
];
const MARKERS: [&str; 2] = ["nomcast", "noop"];

/// Writes `<dir>/w/w`, `<dir>/w-nomcast/w` (+ marker `nomcast`) and `<dir>/w-noop/w`
/// (+ marker `noop`), mode 0755. Idempotent; each binary is replaced atomically, because
/// running containers may be executing the old one.
pub fn install(dir: &Path) -> io::Result<()> {
    for (subdir, marker) in VARIANTS {
        let subdir = dir.join(subdir);
        fs::create_dir_all(&subdir)?;
        install_file(&subdir.join("w"), WEAVEWAIT, 0o755)?;
        // A stray marker would change the variant's mode.
        for other in MARKERS.iter().filter(|m| Some(**m) != marker) {
            remove_if_present(&subdir.join(other))?;
        }
        if let Some(marker) = marker {
            install_file(&subdir.join(marker), b"", 0o644)?;
        }
    }
    Ok(())
}

/// Writes `content` to `path` via a temporary file and a rename, unless it is already there.
fn install_file(path: &Path, content: &[u8], mode: u32) -> io::Result<()> {
    if let Ok(meta) = fs::metadata(path) {
        if meta.is_file()
            && meta.permissions().mode() & 0o7777 == mode
            && fs::read(path)? == content
        {
            return Ok(());
        }
    }
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    let written = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(content)?;
        // The umask may have narrowed the mode given at open.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic on setup failures
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn embedded_binary_is_an_elf_executable() {
        assert!(WEAVEWAIT.starts_with(b"\x7fELF"));
    }

    #[test]
    fn install_is_complete_and_idempotent() {
        let dir = std::env::temp_dir().join(format!("weavewait-install-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("w")).unwrap();
        // Leftovers from an older install: a stale binary and a stray marker.
        fs::write(dir.join("w/w"), b"old").unwrap();
        fs::write(dir.join("w/noop"), b"").unwrap();

        install(&dir).unwrap();
        let check = |dir: &Path| {
            for (subdir, marker) in VARIANTS {
                let bin = dir.join(subdir).join("w");
                assert_eq!(fs::read(&bin).unwrap(), WEAVEWAIT, "{}", bin.display());
                assert_eq!(fs::metadata(&bin).unwrap().mode() & 0o7777, 0o755);
                for m in MARKERS {
                    assert_eq!(dir.join(subdir).join(m).exists(), Some(m) == marker);
                }
                let names: Vec<_> = fs::read_dir(dir.join(subdir)).unwrap().collect();
                assert_eq!(
                    names.len(),
                    1 + usize::from(marker.is_some()),
                    "no temp files left"
                );
            }
        };
        check(&dir);
        let inode = fs::metadata(dir.join("w/w")).unwrap().ino();
        install(&dir).unwrap();
        check(&dir);
        // Unchanged content is left in place rather than rewritten.
        assert_eq!(fs::metadata(dir.join("w/w")).unwrap().ino(), inode);
        fs::remove_dir_all(&dir).unwrap();
    }
}
