//! The router/proxy image, built locally from this very executable: a minimal rootfs holding
//! the binary, the shared libraries it links, and `iptables` (the router installs rules),
//! loaded with `docker import`. No registry is needed or reachable.

use std::collections::BTreeSet;
use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use bollard::query_parameters::CreateImageOptions;
use bollard::Docker;
use futures::StreamExt;

pub const BINARY_IN_IMAGE: &str = "/home/weave/weave";
const REPOSITORY: &str = "weave-rs";

/// Make sure the image for this executable exists; returns its reference. The tag carries a
/// hash of the executable, so a rebuilt `weave` gets a fresh image and an unchanged one is not
/// rebuilt on every launch.
pub async fn ensure(docker: &Docker) -> Result<String> {
    let exe = std::env::current_exe().context("locating the weave executable")?;
    let bytes = std::fs::read(&exe).with_context(|| format!("reading {}", exe.display()))?;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    hasher.write(&bytes);
    let tag = format!("{}-{:016x}", env!("CARGO_PKG_VERSION"), hasher.finish());
    let reference = format!("{REPOSITORY}:{tag}");
    if docker.inspect_image(&reference).await.is_ok() {
        return Ok(reference);
    }
    let rootfs = rootfs_tar(&exe).context("building the weave image's root filesystem")?;
    let options = CreateImageOptions {
        from_src: Some("-".into()),
        repo: Some(REPOSITORY.into()),
        tag: Some(tag),
        changes: vec![
            "ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin".into(),
            format!("ENTRYPOINT [\"{BINARY_IN_IMAGE}\"]"),
        ],
        ..Default::default()
    };
    let mut progress =
        docker.create_image(Some(options), Some(bollard::body_full(rootfs.into())), None);
    while let Some(step) = progress.next().await {
        step.context("importing the weave image into Docker")?;
    }
    Ok(reference)
}

fn rootfs_tar(exe: &Path) -> Result<Vec<u8>> {
    let mut files: Vec<(PathBuf, PathBuf)> = vec![(exe.to_path_buf(), BINARY_IN_IMAGE.into())];
    let mut libs = BTreeSet::new();
    libs.extend(shared_libraries(exe)?);
    // iptables as the host has it (nft or legacy flavour must match what dockerd uses).
    if let Some(iptables) = find_in_path("iptables") {
        let real = std::fs::canonicalize(&iptables)?;
        libs.extend(shared_libraries(&real)?);
        files.push((real, "/usr/sbin/iptables".into()));
        // Its match/target modules are dlopen()ed, so ldd does not list them.
        for dir in [
            "/usr/lib/x86_64-linux-gnu/xtables",
            "/usr/lib/xtables",
            "/lib/xtables",
        ] {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                libs.extend(shared_libraries(&path).unwrap_or_default());
                files.push((path.clone(), path));
            }
        }
    }
    files.extend(libs.into_iter().map(|lib| (lib.clone(), lib)));

    let mut tar = tar::Builder::new(Vec::new());
    tar.follow_symlinks(true);
    // Docker's importer rejects GNU sparse entries (type S).
    tar.sparse(false);
    for dir in [
        "tmp",
        "etc",
        "proc",
        "sys",
        "dev",
        "run",
        "var/run/weave",
        "var/lib/weave",
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(if dir == "tmp" { 0o1777 } else { 0o755 });
        header.set_size(0);
        tar.append_data(&mut header, dir, std::io::empty())?;
    }
    for (source, target) in files {
        let relative = target.strip_prefix("/").unwrap_or(&target);
        tar.append_path_with_name(&source, relative)
            .with_context(|| format!("adding {} to the image", source.display()))?;
    }
    Ok(tar.into_inner()?)
}

/// The absolute paths `ldd` reports for a binary (none for a static one).
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd (package libc-bin) to find the libraries weave needs")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() && !text.contains("not a dynamic executable") {
        bail!(
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(parse_ldd(&text))
}

fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ldd_output() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n\
                    \tlibmissing.so => not found\n";
        assert_eq!(
            parse_ldd(text),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }
}
