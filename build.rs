//! Builds the `weavewait` package as a static executable and leaves it at `$OUT_DIR/weavewait`,
//! where `src/weavewait.rs` embeds it: the `weave` binary installs it into containers' `/w`.
//!
//! A nested cargo run, because a static binary needs its own rustflags (`+crt-static`) and the
//! outer build's target, flags and wrappers must not leak into it.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    if let Err(message) = build_weavewait() {
        eprintln!("error: building the static weavewait binary failed: {message}");
        std::process::exit(1);
    }
}

fn build_weavewait() -> Result<(), String> {
    println!("cargo:rerun-if-changed=proxy/weavewait/src");
    println!("cargo:rerun-if-changed=proxy/weavewait/Cargo.toml");
    println!("cargo:rerun-if-changed=Cargo.lock");

    let var = |name: &str| env::var(name).map_err(|e| format!("${name}: {e}"));
    let out_dir = PathBuf::from(var("OUT_DIR")?);
    let manifest_dir = PathBuf::from(var("CARGO_MANIFEST_DIR")?);
    let target = var("TARGET")?;
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = out_dir.join("weavewait-target");

    let mut command = Command::new(cargo);
    command
        .arg("build")
        .arg("--release")
        .args(["-p", "weavewait"])
        .arg("--manifest-path")
        .arg(manifest_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .args(["--target", &target])
        // With an explicit --target these flags reach only the target crates, never the build
        // scripts or proc macros, which cannot be static.
        // Arguments separated by 0x1f. Stripped: the binary is embedded in `weave`.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Ctarget-feature=+crt-static\x1f-Cstrip=symbols",
        )
        // The outer build's settings are for the outer build: its flags, its target dir and
        // jobserver, and wrappers such as clippy-driver or sccache.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .env_remove("CARGO_MAKEFLAGS")
        .env_remove("MAKEFLAGS")
        .env_remove("MFLAGS")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_BUILD_RUSTC_WRAPPER")
        .env_remove("CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER");
    let target_rustflags = format!(
        "CARGO_TARGET_{}_RUSTFLAGS",
        target.to_uppercase().replace(['-', '.'], "_")
    );
    command.env_remove(target_rustflags);

    let status = command
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!("`{command:?}` exited with {status}"));
    }

    let built = target_dir.join(&target).join("release").join("weavewait");
    let dest = out_dir.join("weavewait");
    std::fs::copy(&built, &dest)
        .map_err(|e| format!("cannot copy {} to {}: {e}", built.display(), dest.display()))?;
    Ok(())
}
