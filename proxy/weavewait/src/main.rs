//! weavewait, the `/w/w` entrypoint the proxy gives woven containers (spec §3.6): wait until the
//! weave interface `ethwe` is up (and, unless told otherwise, has its multicast route), then exec
//! the container's real command.
//!
//! The mode comes from a marker file next to the executable: `noop` (do not wait), `nomcast`
//! (wait for `ethwe` only), or none (wait for `ethwe` and the route to 224.0.0.0/4).
//!
//! Built as a static binary, so it runs in any image (even without libc) and as any user.
//! Waiting is event-driven: subscribe to rtnetlink link and route changes first, then check the
//! current state, then re-check after each notification, so no change can slip in between.

use std::ffi::{CString, OsStr, OsString};
use std::fmt;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use nix::errno::Errno;
use nix::ifaddrs::getifaddrs;
use nix::libc;
use nix::net::if_::InterfaceFlags;
use nix::sys::socket::{
    bind, recv, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};

/// The interface the router plumbs into the container.
const INTERFACE: &str = "ethwe";
/// The route the router adds last, so its presence means the attach is complete.
const MULTICAST_NET: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 0);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    NoWait,
    Interface,
    InterfaceAndRoute,
}

/// The mode for an executable living in `dir`.
fn mode_in(dir: &Path) -> Mode {
    if dir.join("noop").exists() {
        Mode::NoWait
    } else if dir.join("nomcast").exists() {
        Mode::Interface
    } else {
        Mode::InterfaceAndRoute
    }
}

/// The directory of this executable: `/proc/self/exe`, or argv[0] when /proc is unavailable.
fn own_dir(argv0: Option<&OsStr>) -> Option<PathBuf> {
    let exe = std::env::current_exe()
        .ok()
        .or_else(|| argv0.map(PathBuf::from))?;
    exe.parent().map(Path::to_path_buf)
}

#[derive(Debug)]
enum WaitError {
    Netlink(&'static str, Errno),
    Interfaces(Errno),
    RouteTable(io::Error),
}

impl fmt::Display for WaitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitError::Netlink(op, errno) => write!(f, "netlink {op}: {}", errno_text(*errno)),
            WaitError::Interfaces(errno) => {
                write!(f, "listing interfaces: {}", errno_text(*errno))
            }
            WaitError::RouteTable(e) => write!(f, "reading /proc/net/route: {e}"),
        }
    }
}

/// Blocks until the network is ready for `mode`.
fn wait_for_network(mode: Mode) -> Result<(), WaitError> {
    if mode == Mode::NoWait {
        return Ok(());
    }
    // Subscribe before the first check (#1882): every later change wakes us up.
    let sock = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
    .map_err(|e| WaitError::Netlink("socket", e))?;
    let groups = (libc::RTMGRP_LINK | libc::RTMGRP_IPV4_ROUTE) as u32;
    bind(sock.as_raw_fd(), &NetlinkAddr::new(0, groups))
        .map_err(|e| WaitError::Netlink("bind", e))?;
    let mut buf = vec![0u8; 16 * 1024];
    while !network_ready(mode)? {
        // The message only says "something changed"; the state is re-read from scratch.
        match recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            // ENOBUFS: notifications were dropped, which is just another reason to re-check.
            Ok(_) | Err(Errno::ENOBUFS) | Err(Errno::EINTR) => {}
            Err(e) => return Err(WaitError::Netlink("recv", e)),
        }
    }
    Ok(())
}

fn network_ready(mode: Mode) -> Result<bool, WaitError> {
    if !interface_up(INTERFACE)? {
        return Ok(false);
    }
    if mode == Mode::Interface {
        return Ok(true);
    }
    let table = std::fs::read_to_string("/proc/net/route").map_err(WaitError::RouteTable)?;
    Ok(has_route(&table, INTERFACE, MULTICAST_NET))
}

fn interface_up(name: &str) -> Result<bool, WaitError> {
    let mut addrs = getifaddrs().map_err(WaitError::Interfaces)?;
    Ok(addrs.any(|a| a.interface_name == name && a.flags.contains(InterfaceFlags::IFF_UP)))
}

/// Whether `/proc/net/route` has a route to `dest` via `iface` (any mask, like Weave's check).
fn has_route(table: &str, iface: &str, dest: Ipv4Addr) -> bool {
    table.lines().skip(1).any(|line| {
        let mut fields = line.split_whitespace();
        fields.next() == Some(iface) && fields.next().and_then(parse_route_addr) == Some(dest)
    })
}

/// `/proc/net/route` prints each network-order address as a native-endian hex u32
/// (224.0.0.0 is `000000E0` on x86).
fn parse_route_addr(hex: &str) -> Option<Ipv4Addr> {
    if hex.len() != 8 {
        return None;
    }
    let value = u32::from_str_radix(hex, 16).ok()?;
    Some(Ipv4Addr::from(value.to_ne_bytes()))
}

/// Go's `exec.LookPath`: a name with a `/` is used as is; otherwise the first executable
/// regular file of that name in `$PATH` (an empty entry meaning the current directory).
/// Errors are the messages Go prints.
fn look_path(file: &OsStr, path_var: Option<&OsStr>) -> Result<PathBuf, String> {
    let name = file.to_string_lossy();
    if file.as_bytes().contains(&b'/') {
        let path = PathBuf::from(file);
        return match check_executable(&path) {
            Ok(()) => Ok(path),
            Err(why) => Err(format!("exec: {name:?}: {why}")),
        };
    }
    let path_var = path_var.map(OsStr::as_bytes).unwrap_or_default();
    if !path_var.is_empty() {
        for dir in path_var.split(|b| *b == b':') {
            let dir = if dir.is_empty() {
                Path::new(".")
            } else {
                Path::new(OsStr::from_bytes(dir))
            };
            let candidate = dir.join(file);
            if check_executable(&candidate).is_ok() {
                return Ok(candidate);
            }
        }
    }
    Err(format!(
        "exec: {name:?}: executable file not found in $PATH"
    ))
}

/// Go's `findExecutable`: exists (following links), is not a directory, has an x bit.
fn check_executable(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("stat {}: {}", path.display(), io_error_text(&e)))?;
    if meta.is_dir() {
        return Err(errno_text(Errno::EISDIR));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(errno_text(Errno::EACCES));
    }
    Ok(())
}

/// strerror text in Go's style ("no such file or directory").
fn errno_text(errno: Errno) -> String {
    let desc = errno.desc();
    let mut chars = desc.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => desc.to_string(),
    }
}

fn io_error_text(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => errno_text(Errno::from_raw(code)),
        None => e.to_string(),
    }
}

/// Replaces this process with `path`, argv `args` (args[0] as the user gave it) and the same
/// environment. Returns only on failure.
fn exec(path: &Path, args: &[OsString]) -> String {
    let to_c = |s: &OsStr| CString::new(s.as_bytes());
    let path_c = match to_c(path.as_os_str()) {
        Ok(p) => p,
        Err(_) => return format!("exec: {:?}: path contains a NUL byte", path.display()),
    };
    let argv: Result<Vec<CString>, _> = args.iter().map(|a| to_c(a)).collect();
    let argv = match argv {
        Ok(argv) => argv,
        Err(_) => return "exec: an argument contains a NUL byte".to_string(),
    };
    match nix::unistd::execv(&path_c, &argv) {
        Ok(never) => match never {},
        Err(errno) => format!(
            "exec: {:?}: {}",
            path.display().to_string(),
            errno_text(errno)
        ),
    }
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    let mode = own_dir(args.first().map(OsString::as_os_str))
        .map(|dir| mode_in(&dir))
        .unwrap_or(Mode::InterfaceAndRoute);
    if let Err(e) = wait_for_network(mode) {
        eprintln!("weavewait: {e}");
        return ExitCode::FAILURE;
    }
    let Some(command) = args.get(1) else {
        eprintln!("No command specified");
        return ExitCode::FAILURE;
    };
    let path_var = std::env::var_os("PATH");
    match look_path(command, path_var.as_deref()) {
        Ok(path) => eprintln!("{}", exec(&path, &args[1..])),
        Err(message) => eprintln!("{message}"),
    }
    ExitCode::FAILURE
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic on setup failures
mod tests {
    use super::*;
    use std::fs;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("weavewait-test-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn touch(path: &Path, mode: u32) {
        fs::write(path, b"#!/bin/sh\n").unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    const ROUTES: &str = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010011AC\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
ethwe\t0000200A\t00000000\t0001\t0\t0\t0\t0000F0FF\t0\t0\t0
ethwe\t000000E0\t00000000\t0001\t0\t0\t0\t000000F0\t0\t0\t0
";

    #[test]
    fn route_addresses_are_native_endian() {
        if cfg!(target_endian = "little") {
            assert_eq!(parse_route_addr("000000E0"), Some(MULTICAST_NET));
            assert_eq!(
                parse_route_addr("010011AC"),
                Some(Ipv4Addr::new(172, 17, 0, 1))
            );
            assert_eq!(
                parse_route_addr("000000F0"),
                Some(Ipv4Addr::new(240, 0, 0, 0))
            );
        }
        assert_eq!(parse_route_addr("E0"), None);
        assert_eq!(parse_route_addr("zzzzzzzz"), None);
    }

    #[test]
    fn finds_multicast_route_on_ethwe_only() {
        if cfg!(target_endian = "little") {
            assert!(has_route(ROUTES, "ethwe", MULTICAST_NET));
            assert!(!has_route(ROUTES, "eth0", MULTICAST_NET));
            let without: String = ROUTES.lines().take(4).collect::<Vec<_>>().join("\n");
            assert!(!has_route(&without, "ethwe", MULTICAST_NET));
            let on_eth0 = ROUTES.replace("ethwe\t000000E0", "eth0\t000000E0");
            assert!(!has_route(&on_eth0, "ethwe", MULTICAST_NET));
        }
        assert!(!has_route("", "ethwe", MULTICAST_NET));
        assert!(!has_route("Iface\tDestination\n", "ethwe", MULTICAST_NET));
    }

    #[test]
    fn mode_from_marker_files() {
        let dir = TempDir::new("mode");
        assert_eq!(mode_in(&dir.0), Mode::InterfaceAndRoute);
        touch(&dir.0.join("nomcast"), 0o644);
        assert_eq!(mode_in(&dir.0), Mode::Interface);
        touch(&dir.0.join("noop"), 0o644);
        assert_eq!(mode_in(&dir.0), Mode::NoWait);
        assert_eq!(
            own_dir(Some(OsStr::new("/w/w"))).map(|d| d.is_dir()),
            Some(true)
        );
    }

    #[test]
    fn look_path_like_go() {
        let dir = TempDir::new("path");
        let bin = dir.0.join("bin");
        let other = dir.0.join("other");
        fs::create_dir_all(&bin).unwrap();
        fs::create_dir_all(other.join("tool")).unwrap();
        touch(&bin.join("tool"), 0o755);
        touch(&bin.join("data"), 0o644);
        touch(&other.join("data"), 0o700);
        let path_var = format!("{}:{}", other.display(), bin.display());
        let path_var = Some(OsStr::new(&path_var));

        // A directory of the same name earlier in PATH is skipped.
        assert_eq!(
            look_path(OsStr::new("tool"), path_var).unwrap(),
            bin.join("tool")
        );
        // The first executable wins; non-executables are skipped.
        assert_eq!(
            look_path(OsStr::new("data"), path_var).unwrap(),
            other.join("data")
        );
        assert_eq!(
            look_path(OsStr::new("foo"), path_var).unwrap_err(),
            "exec: \"foo\": executable file not found in $PATH"
        );
        assert!(look_path(OsStr::new("tool"), None).is_err());
        assert!(look_path(OsStr::new("tool"), Some(OsStr::new(""))).is_err());

        // Names with a slash are not searched.
        let direct = bin.join("tool");
        assert_eq!(look_path(direct.as_os_str(), None).unwrap(), direct);
        let missing = bin.join("missing");
        assert_eq!(
            look_path(missing.as_os_str(), path_var).unwrap_err(),
            format!(
                "exec: {:?}: stat {}: no such file or directory",
                missing.display().to_string(),
                missing.display()
            )
        );
        let not_exec = bin.join("data");
        assert!(look_path(not_exec.as_os_str(), None)
            .unwrap_err()
            .ends_with(": permission denied"));
        assert!(look_path(bin.as_os_str(), None)
            .unwrap_err()
            .ends_with(": is a directory"));
    }
}
