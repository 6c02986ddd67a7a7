//! Images for test hosts, made without a registry: a busybox root filesystem packed as a tarball
//! for `docker import`, and small `docker build` contexts.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Environment variable naming a statically linked busybox (default `/bin/busybox`, from
/// Debian's busybox-static).
pub const BUSYBOX_ENV: &str = "WEAVE_TEST_BUSYBOX";
const DEFAULT_BUSYBOX: &str = "/bin/busybox";

/// The tag hosts import the busybox tarball as.
pub const BUSYBOX_IMAGE: &str = "busybox:latest";

/// `docker import --change` arguments that make the tarball a usable image (without the PATH,
/// `sh` is not found).
pub const BUSYBOX_CHANGES: [&str; 2] = ["ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin", r#"CMD ["sh"]"#];

pub fn busybox_path() -> PathBuf {
    std::env::var_os(BUSYBOX_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BUSYBOX))
}

/// Whether an ELF executable asks for a dynamic loader (has a PT_INTERP program header).
fn is_dynamic_elf(bytes: &[u8]) -> Option<bool> {
    if bytes.get(..4)? != b"\x7fELF" || *bytes.get(4)? != 2 || *bytes.get(5)? != 1 {
        return None; // not a little-endian 64-bit ELF: cannot tell
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(bytes.get(o..o + 2)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(bytes.get(o..o + 8)?.try_into().ok()?));
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for i in 0..phnum {
        let at = phoff.checked_add(i.checked_mul(phentsize)?)?;
        let p_type = u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?);
        if p_type == 3 {
            return Some(true);
        }
    }
    Some(false)
}

/// Writes a busybox root filesystem as a tarball to `dest`: the static binary in /bin, a symlink
/// per applet at its usual place (`busybox --list-full`), /etc/passwd and /etc/group, and the
/// directories a container expects.
pub fn write_busybox_tar(dest: &Path) -> Result<()> {
    let busybox = busybox_path();
    let binary = std::fs::read(&busybox).with_context(|| {
        format!(
            "cannot read {} (install busybox-static, or set {BUSYBOX_ENV})",
            busybox.display()
        )
    })?;
    if is_dynamic_elf(&binary) == Some(true) {
        bail!(
            "{} is dynamically linked; the test image needs a static one (busybox-static)",
            busybox.display()
        );
    }
    let list = Command::new(&busybox)
        .arg("--list-full")
        .output()
        .with_context(|| format!("cannot run {} --list-full", busybox.display()))?;
    if !list.status.success() {
        bail!("{} --list-full failed", busybox.display());
    }
    let applets = String::from_utf8_lossy(&list.stdout).into_owned();

    let tmp = dest.with_extension("tar.tmp");
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut tar = tar::Builder::new(file);
    let dirs = [
        ("bin", 0o755),
        ("sbin", 0o755),
        ("usr", 0o755),
        ("usr/bin", 0o755),
        ("usr/sbin", 0o755),
        ("etc", 0o755),
        ("proc", 0o755),
        ("sys", 0o755),
        ("dev", 0o755),
        ("root", 0o700),
        ("var", 0o755),
        ("run", 0o755),
        ("tmp", 0o1777),
    ];
    for (dir, mode) in dirs {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(mode);
        header.set_size(0);
        tar.append_data(&mut header, format!("{dir}/"), std::io::empty())?;
    }
    let files: [(&str, &[u8], u32); 3] = [
        ("bin/busybox", &binary, 0o755),
        ("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644),
        ("etc/group", b"root:x:0:\n", 0o644),
    ];
    for (path, data, mode) in files {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(mode);
        header.set_size(data.len() as u64);
        tar.append_data(&mut header, path, data)?;
    }
    for applet in applets.lines().map(str::trim) {
        // The binary itself is already there; linuxrc is an init we do not want.
        if applet.is_empty() || applet == "bin/busybox" || applet == "linuxrc" {
            continue;
        }
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_mode(0o777);
        header.set_size(0);
        tar.append_link(&mut header, applet, "/bin/busybox")?;
    }
    tar.into_inner()?.sync_all()?;
    std::fs::rename(&tmp, dest)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), dest.display()))?;
    Ok(())
}

/// Writes a `docker build` context: `dir/Dockerfile` with this content.
pub fn write_build_context(dir: &Path, dockerfile: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(dir.join("Dockerfile"), dockerfile)
        .with_context(|| format!("cannot write {}/Dockerfile", dir.display()))?;
    Ok(dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_static_from_dynamic() -> Result<()> {
        let sh = std::fs::read("/bin/sh")?;
        assert_eq!(is_dynamic_elf(&sh), Some(true));
        assert_eq!(is_dynamic_elf(b"#!/bin/sh\n"), None);
        Ok(())
    }
}
