//! Injection: a raw `AF_PACKET` socket bound to the capture interface, with `PACKET_VNET_HDR`.
//!
//! This is the socket `pcap_sendpacket` writes to, plus the virtio-net header that lets us
//! hand the kernel a merged TCP frame ([`crate::gro`]) larger than the interface MTU: the
//! kernel takes it as a segmentation-offload frame and only cuts it up if it has to leave
//! through an interface that cannot take it whole. libpcap has no way to pass that header.
//! Protocol 0: the socket never receives, so it costs nothing on the capture path.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use crate::gro::{GsoInfo, PLAIN_VNET_HDR, VNET_HDR_LEN};

use super::CaptureError;

/// Sends frames out of the interface (into the bridge, for `vethwe-pcap`). Cheap to clone;
/// usable from any thread. Injected frames are outbound there, so the capture never sees them.
#[derive(Clone)]
pub struct Injector {
    iface: Arc<str>,
    socket: Arc<OwnedFd>,
}

impl std::fmt::Debug for Injector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Injector")
            .field("iface", &self.iface)
            .finish_non_exhaustive()
    }
}

impl Injector {
    /// Open the injection socket on `iface` in the calling thread's network namespace.
    pub fn open(iface: &str) -> Result<Injector, CaptureError> {
        let err = |op: &'static str| {
            let iface = iface.to_string();
            move |source| CaptureError::Io { op, iface, source }
        };
        let index = nix::net::if_::if_nametoindex(iface)
            .map_err(io::Error::from)
            .map_err(err("find the interface"))?;
        // SAFETY: plain socket(2); the result is checked before it is wrapped.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(err("open a packet socket on")(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        set_int_option(&socket, libc::PACKET_VNET_HDR, 1)
            .map_err(err("enable virtio-net headers on"))?;
        // Best effort: the veth has no queue anyway.
        if let Err(e) = set_int_option(&socket, libc::PACKET_QDISC_BYPASS, 1) {
            tracing::debug!(%iface, error = %e, "no qdisc bypass for injection");
        }
        // SAFETY: an all-zero `sockaddr_ll` is a valid value; the fields we need are set below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as libc::sa_family_t;
        addr.sll_ifindex = index as libc::c_int;
        // SAFETY: `addr` is a live `sockaddr_ll` and its exact size is passed.
        let rc = unsafe {
            libc::bind(
                socket.as_raw_fd(),
                std::ptr::from_ref(&addr).cast::<libc::sockaddr>(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(err("bind the injection socket to")(
                io::Error::last_os_error(),
            ));
        }
        Ok(Injector {
            iface: Arc::from(iface),
            socket: Arc::new(socket),
        })
    }

    /// Send one Ethernet frame; `gso` when it is a merged TCP frame. Blocking, but only for
    /// the hand-over to the kernel.
    pub fn inject(&self, frame: &[u8], gso: Option<GsoInfo>) -> Result<(), CaptureError> {
        let header = gso.map_or(PLAIN_VNET_HDR, |g| g.vnet_header());
        let iov = [
            libc::iovec {
                iov_base: header.as_ptr() as *mut libc::c_void,
                iov_len: VNET_HDR_LEN,
            },
            libc::iovec {
                iov_base: frame.as_ptr() as *mut libc::c_void,
                iov_len: frame.len(),
            },
        ];
        // SAFETY: both iovecs point into buffers that outlive the call; writev only reads them.
        let n = unsafe { libc::writev(self.socket.as_raw_fd(), iov.as_ptr(), 2) };
        if n < 0 {
            return Err(CaptureError::Io {
                op: "inject a frame into",
                iface: self.iface.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// The interface frames go out of.
    pub fn iface(&self) -> &str {
        &self.iface
    }
}

fn set_int_option(socket: &OwnedFd, option: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: the option value points to a live `c_int` whose exact size is passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_PACKET,
            option,
            std::ptr::from_ref(&value).cast::<libc::c_void>(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
