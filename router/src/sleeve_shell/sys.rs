//! Socket calls the standard library does not offer: the per-socket PMTU discovery mode
//! (`IP_MTU_DISCOVER`, switched between "set DF, refuse datagrams over the path MTU" and "no
//! DF, let the kernel fragment"), the kernel's path MTU (`IP_MTU`), buffer sizes, and UDP
//! segmentation offload both ways: one `sendmsg` carries a run of equal-sized datagrams
//! (`UDP_SEGMENT`), one `recvmsg` returns a run the kernel kept together (`UDP_GRO`).

#![allow(unsafe_code)]

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};

use std::io::{IoSlice, IoSliceMut};
use std::net::SocketAddrV4;

use nix::sys::socket::{
    getsockopt, recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned,
    MsgFlags, SockaddrIn, SockaddrStorage,
};

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

/// Ask for `bytes` of socket receive and send buffer. `SO_*BUFFORCE` (CAP_NET_ADMIN) goes past
/// `net.core.[rw]mem_max`; without the capability the capped request is the best we get.
pub(super) fn set_buffers(socket: &impl AsFd, bytes: usize) -> io::Result<()> {
    if setsockopt(socket, sockopt::RcvBufForce, &bytes).is_err() {
        setsockopt(socket, sockopt::RcvBuf, &bytes).map_err(io::Error::from)?;
    }
    if setsockopt(socket, sockopt::SndBufForce, &bytes).is_err() {
        setsockopt(socket, sockopt::SndBuf, &bytes).map_err(io::Error::from)?;
    }
    Ok(())
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

/// Ask the kernel to keep runs of datagrams from one sender together (`UDP_GRO`); read them
/// with [`recv_segments`].
pub(super) fn enable_gro(socket: &impl AsFd) -> io::Result<()> {
    setsockopt(socket, sockopt::UdpGroSegment, &true).map_err(io::Error::from)
}

/// One received run of datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Segments {
    pub len: usize,
    pub from: SocketAddr,
    /// Size of each datagram but the last; `None`: one datagram.
    pub segment_size: Option<usize>,
    /// The run did not fit `buf` and was cut.
    pub truncated: bool,
}

/// `recvmsg` into `buf`, with the `UDP_GRO` segment size if the kernel merged datagrams.
pub(super) fn recv_segments(socket: &impl AsFd, buf: &mut [u8]) -> io::Result<Segments> {
    let mut cmsg = nix::cmsg_space!(libc::c_int);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(
        socket.as_fd().as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )
    .map_err(io::Error::from)?;
    let mut segment_size = None;
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::UdpGroSegments(size) = c {
                segment_size = usize::try_from(size).ok().filter(|s| *s > 0);
            }
        }
    }
    let from = msg
        .address
        .and_then(|a| {
            a.as_sockaddr_in()
                .map(|v4| SocketAddr::V4(SocketAddrV4::from(*v4)))
        })
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "datagram from a non-IPv4 address",
            )
        })?;
    Ok(Segments {
        len: msg.bytes,
        from,
        segment_size,
        truncated: msg.flags.contains(MsgFlags::MSG_TRUNC),
    })
}

/// Send `buf` to `to` as datagrams of `segment_size` bytes (the last may be shorter) in one
/// call (`UDP_SEGMENT`).
pub(super) fn send_segments(
    socket: &impl AsFd,
    buf: &[u8],
    segment_size: u16,
    to: SocketAddrV4,
) -> io::Result<usize> {
    sendmsg(
        socket.as_fd().as_raw_fd(),
        &[IoSlice::new(buf)],
        &[ControlMessage::UdpGsoSegments(&segment_size)],
        MsgFlags::empty(),
        Some(&SockaddrIn::from(to)),
    )
    .map_err(io::Error::from)
}
