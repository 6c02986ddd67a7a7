//! The two things netlink cannot do for us: switch TX checksum offload (ethtool ioctl) and send a
//! gratuitous ARP (raw packet socket). Both act in the network namespace of the *calling thread*,
//! because that is where the socket they create lives.

#![allow(unsafe_code)]

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

use super::MacAddr;

/// `ETHTOOL_STXCSUM` from linux/ethtool.h: set TX checksum offload.
const ETHTOOL_STXCSUM: u32 = 0x0000_0017;
/// `ETHTOOL_GTXCSUM`: read it.
const ETHTOOL_GTXCSUM: u32 = 0x0000_0016;
/// EtherType of ARP.
const ETH_P_ARP: u16 = 0x0806;

/// `struct ethtool_value` from linux/ethtool.h.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// An `ifreq` naming `ifname` whose data pointer is `data`.
fn ifreq(ifname: &str, data: *mut EthtoolValue) -> io::Result<libc::ifreq> {
    let bytes = ifname.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid interface name {ifname:?}"),
        ));
    }
    let mut name = [0 as libc::c_char; libc::IFNAMSIZ];
    for (dst, src) in name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(libc::ifreq {
        ifr_name: name,
        ifr_ifru: libc::__c_anonymous_ifr_ifru {
            ifru_data: data.cast(),
        },
    })
}

fn ethtool(ifname: &str, value: &mut EthtoolValue) -> io::Result<()> {
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let mut req = ifreq(ifname, value)?;
    // SAFETY: `sock` is an open socket owned by this function; `req` is a fully initialised
    // ifreq whose name is NUL-terminated (checked in `ifreq`) and whose data pointer points at
    // `value`, an `ethtool_value` that outlives the call. SIOCETHTOOL reads `cmd` and reads or
    // writes only `data` of that struct.
    let rc = unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCETHTOOL as _,
            &mut req as *mut libc::ifreq,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `ethtool -K <ifname> tx on|off`.
pub(super) fn set_tx_checksum(ifname: &str, on: bool) -> io::Result<()> {
    let mut value = EthtoolValue {
        cmd: ETHTOOL_STXCSUM,
        data: u32::from(on),
    };
    ethtool(ifname, &mut value)
}

/// Whether TX checksum offload is on for `ifname`.
pub(super) fn tx_checksum(ifname: &str) -> io::Result<bool> {
    let mut value = EthtoolValue {
        cmd: ETHTOOL_GTXCSUM,
        data: 0,
    };
    ethtool(ifname, &mut value)?;
    Ok(value.data != 0)
}

/// A broadcast gratuitous ARP request announcing that `ip` is at `mac` (sender and target
/// protocol address both `ip`).
pub(super) fn garp_frame(mac: MacAddr, ip: Ipv4Addr) -> [u8; 42] {
    let mut frame = [0u8; 42];
    frame[0..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(&mac.0);
    frame[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    frame[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
    frame[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol type: IPv4
    frame[18] = 6; // hardware address length
    frame[19] = 4; // protocol address length
    frame[20..22].copy_from_slice(&1u16.to_be_bytes()); // operation: request
    frame[22..28].copy_from_slice(&mac.0);
    frame[28..32].copy_from_slice(&ip.octets());
    // target hardware address stays zero
    frame[38..42].copy_from_slice(&ip.octets());
    frame
}

/// Send one gratuitous ARP for `ip` out of the interface with index `ifindex`.
pub(super) fn send_garp(ifindex: u32, mac: MacAddr, ip: Ipv4Addr) -> io::Result<()> {
    let ifindex = libc::c_int::try_from(ifindex)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface index overflow"))?;
    let sock = socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let frame = garp_frame(mac, ip);
    let mut sll_addr = [0u8; 8];
    sll_addr[..6].copy_from_slice(&[0xff; 6]);
    let addr = libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as libc::c_ushort,
        sll_protocol: ETH_P_ARP.to_be(),
        sll_ifindex: ifindex,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 6,
        sll_addr,
    };
    // SAFETY: `sock` is an open AF_PACKET socket owned by this function; `frame` is a live
    // buffer of the length passed; `addr` is a fully initialised sockaddr_ll and the length
    // passed is exactly its size. sendto only reads from both.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garp_frame_layout() {
        let mac = MacAddr([0x7e, 0x21, 0x4a, 0x70, 0x2f, 0x45]);
        let f = garp_frame(mac, Ipv4Addr::new(10, 2, 1, 1));
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac.0);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[14..22], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&f[22..28], &mac.0);
        assert_eq!(&f[28..32], &[10, 2, 1, 1]);
        assert_eq!(&f[32..38], &[0; 6]);
        assert_eq!(&f[38..42], &[10, 2, 1, 1]);
    }

    #[test]
    fn rejects_bad_interface_names() {
        let mut v = EthtoolValue { cmd: 0, data: 0 };
        assert!(ifreq("", &mut v).is_err());
        assert!(ifreq("a-name-that-is-far-too-long", &mut v).is_err());
        assert!(ifreq("nul\0byte", &mut v).is_err());
        assert!(ifreq("ethwe", &mut v).is_ok());
    }
}
