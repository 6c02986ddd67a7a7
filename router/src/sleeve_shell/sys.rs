//! The socket options the standard library and nix do not wrap: the per-socket PMTU discovery
//! mode (`IP_MTU_DISCOVER`), switched between "set DF, refuse datagrams over the path MTU" and
//! "no DF, let the kernel fragment". Reading the kernel's path MTU (`IP_MTU`) goes through nix.

#![allow(unsafe_code)]

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};

use nix::sys::socket::{getsockopt, sockopt};

/// Set `IP_MTU_DISCOVER` on `socket`: `df` = `IP_PMTUDISC_DO` (DF set; sends larger than the
/// known path MTU fail with EMSGSIZE), else `IP_PMTUDISC_DONT` (no DF; the kernel fragments).
pub(super) fn set_df(socket: &impl AsFd, df: bool) -> io::Result<()> {
    let mode: libc::c_int = if df {
        libc::IP_PMTUDISC_DO
    } else {
        libc::IP_PMTUDISC_DONT
    };
    let fd = socket.as_fd().as_raw_fd();
    // SAFETY: `fd` is a valid open socket borrowed for the duration of the call; the option
    // value points to a live `c_int` whose exact size is passed as the option length.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            std::ptr::from_ref(&mode).cast::<libc::c_void>(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The kernel's current path MTU toward `to` (route MTU, lowered by any PMTU exception learnt
/// from ICMP): a throw-away socket connected to `to`, asked for `IP_MTU`.
pub(super) fn path_mtu(to: SocketAddr) -> io::Result<u16> {
    let probe = UdpSocket::bind(("0.0.0.0", 0))?;
    probe.connect(to)?;
    let mtu = getsockopt(&probe, sockopt::IpMtu).map_err(io::Error::from)?;
    u16::try_from(mtu)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "path MTU out of range"))
}
