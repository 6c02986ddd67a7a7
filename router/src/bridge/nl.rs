//! Small rtnetlink helpers shared by the host side and the container side. Each takes the
//! [`Handle`] of the namespace it should act in.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    BridgePortState, InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoVeth, LinkAttribute,
    LinkFlags, LinkInfo, LinkMessage, State,
};
use rtnetlink::packet_route::route::{RouteProtocol, RouteScope};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkBridgePort, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};

use super::{BridgeError, MacAddr};
use crate::addr::Ipv4Cidr;

pub(super) const ENODEV: i32 = libc::ENODEV;
pub(super) const EEXIST: i32 = libc::EEXIST;
pub(super) const EADDRNOTAVAIL: i32 = libc::EADDRNOTAVAIL;

/// The errno of a netlink NACK, if that is what `e` is.
pub(super) fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => Some(msg.raw_code().abs()),
        _ => None,
    }
}

/// Wrap a netlink failure with the operation and interface it concerned.
pub(super) fn nl_error(op: &'static str, iface: &str, e: rtnetlink::Error) -> BridgeError {
    match e {
        rtnetlink::Error::NetlinkError(msg) => BridgeError::Io {
            op,
            target: iface.to_string(),
            source: msg.to_io(),
        },
        other => BridgeError::Netlink {
            op,
            iface: iface.to_string(),
            source: other,
        },
    }
}

/// The link called `name`, if there is one.
pub(super) async fn link_by_name(
    h: &Handle,
    name: &str,
) -> Result<Option<LinkMessage>, BridgeError> {
    let mut links = h.link().get().match_name(name).execute();
    match links.try_next().await {
        Ok(link) => Ok(link),
        Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
        Err(e) => Err(nl_error("look up link", name, e)),
    }
}

/// Every link in the namespace.
pub(super) async fn all_links(h: &Handle) -> Result<Vec<LinkMessage>, BridgeError> {
    h.link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| nl_error("list links", "*", e))
}

pub(super) fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.as_str()),
        _ => None,
    })
}

pub(super) fn link_mac(link: &LinkMessage) -> Option<MacAddr> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(bytes) => <[u8; 6]>::try_from(bytes.as_slice()).ok().map(MacAddr),
        _ => None,
    })
}

pub(super) fn link_mtu(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(mtu) => Some(*mtu),
        _ => None,
    })
}

pub(super) fn link_kind(link: &LinkMessage) -> Option<&InfoKind> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(kind) => Some(kind),
            _ => None,
        }),
        _ => None,
    })
}

/// Operationally up (carrier on and processed by the kernel's link watcher), not just
/// administratively.
pub(super) fn is_running(link: &LinkMessage) -> bool {
    link.attributes
        .iter()
        .any(|a| matches!(a, LinkAttribute::OperState(State::Up)))
}

/// Is this link a bridge port in the forwarding state?
pub(super) fn is_forwarding_port(link: &LinkMessage) -> bool {
    link.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().any(|info| match info {
            LinkInfo::PortData(InfoPortData::BridgePort(port)) => port
                .iter()
                .any(|p| matches!(p, InfoBridgePort::State(BridgePortState::Forwarding))),
            _ => false,
        }),
        _ => false,
    })
}

pub(super) fn is_up(link: &LinkMessage) -> bool {
    link.header.flags.contains(LinkFlags::Up)
}

fn ipv4_of(msg: &AddressMessage) -> Option<Ipv4Addr> {
    let pick = |want_local: bool| {
        msg.attributes.iter().find_map(|a| match (a, want_local) {
            (AddressAttribute::Local(IpAddr::V4(ip)), true) => Some(*ip),
            (AddressAttribute::Address(IpAddr::V4(ip)), false) => Some(*ip),
            _ => None,
        })
    };
    pick(true).or_else(|| pick(false))
}

/// The IPv4 addresses on link `index`, with the messages needed to delete them.
pub(super) async fn ipv4_addrs(
    h: &Handle,
    index: u32,
    iface: &str,
) -> Result<Vec<(Ipv4Cidr, AddressMessage)>, BridgeError> {
    let msgs: Vec<AddressMessage> = h
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(|e| nl_error("list addresses of", iface, e))?;
    Ok(msgs
        .into_iter()
        .filter(|m| m.header.family == AddressFamily::Inet && m.header.index == index)
        .filter_map(|m| {
            let ip = ipv4_of(&m)?;
            let cidr = Ipv4Cidr::new(ip, m.header.prefix_len).ok()?;
            Some((cidr, m))
        })
        .collect())
}

/// Add `cidr` to link `index`; `Ok(false)` when it was already there.
pub(super) async fn add_addr(
    h: &Handle,
    index: u32,
    cidr: Ipv4Cidr,
    iface: &str,
) -> Result<bool, BridgeError> {
    match h
        .address()
        .add(index, IpAddr::V4(cidr.addr), cidr.prefix_len)
        .execute()
        .await
    {
        Ok(()) => Ok(true),
        Err(e) if errno(&e) == Some(EEXIST) => Ok(false),
        Err(e) => Err(nl_error("add address to", iface, e)),
    }
}

/// Delete an address (as listed by [`ipv4_addrs`]); `Ok(false)` when it was already gone.
pub(super) async fn del_addr(
    h: &Handle,
    msg: AddressMessage,
    iface: &str,
) -> Result<bool, BridgeError> {
    match h.address().del(msg).execute().await {
        Ok(()) => Ok(true),
        Err(e) if errno(&e) == Some(EADDRNOTAVAIL) => Ok(false),
        Err(e) => Err(nl_error("remove address from", iface, e)),
    }
}

/// Applies one link change; `what` names it in the error ("bring up", "set MTU of", ...).
async fn change_link(
    h: &Handle,
    change: LinkMessage,
    what: &'static str,
    iface: &str,
) -> Result<(), BridgeError> {
    h.link()
        .set(change)
        .execute()
        .await
        .map_err(|e| nl_error(what, iface, e))
}

pub(super) async fn set_up(h: &Handle, index: u32, iface: &str) -> Result<(), BridgeError> {
    let change = LinkUnspec::new_with_index(index).up().build();
    change_link(h, change, "bring up", iface).await
}

pub(super) async fn set_mtu(
    h: &Handle,
    index: u32,
    mtu: u32,
    iface: &str,
) -> Result<(), BridgeError> {
    let change = LinkUnspec::new_with_index(index).mtu(mtu).build();
    change_link(h, change, "set MTU of", iface).await
}

pub(super) async fn set_mac(
    h: &Handle,
    index: u32,
    mac: MacAddr,
    iface: &str,
) -> Result<(), BridgeError> {
    let change = LinkUnspec::new_with_index(index)
        .address(mac.0.to_vec())
        .build();
    change_link(h, change, "set MAC address of", iface).await
}

/// Enslave link `index` to bridge `bridge_index` and bring it up.
pub(super) async fn enslave_up(
    h: &Handle,
    index: u32,
    bridge_index: u32,
    iface: &str,
) -> Result<(), BridgeError> {
    let change = LinkUnspec::new_with_index(index)
        .controller(bridge_index)
        .up()
        .build();
    change_link(h, change, "attach to bridge", iface).await
}

/// Turn hairpin mode (reflecting frames back out of the port they came in on) on or off.
pub(super) async fn set_hairpin(
    h: &Handle,
    index: u32,
    on: bool,
    iface: &str,
) -> Result<(), BridgeError> {
    h.link()
        .set_port(LinkBridgePort::new(index).hairpin(on).build())
        .execute()
        .await
        .map_err(|e| nl_error("set hairpin mode on", iface, e))
}

/// Is hairpin mode on for this bridge port? `None` when the link does not say (not a port).
pub(super) fn hairpin(link: &LinkMessage) -> Option<bool> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|info| match info {
            LinkInfo::PortData(InfoPortData::BridgePort(port)) => {
                port.iter().find_map(|p| match p {
                    InfoBridgePort::HairpinMode(on) => Some(*on),
                    _ => None,
                })
            }
            _ => None,
        }),
        _ => None,
    })
}

/// Delete link `index`; `Ok(())` when it is already gone.
pub(super) async fn del_link(h: &Handle, index: u32, iface: &str) -> Result<(), BridgeError> {
    match h.link().del(index).execute().await {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == Some(ENODEV) => Ok(()),
        Err(e) => Err(nl_error("delete link", iface, e)),
    }
}

/// Create a veth pair: `name` here, `peer` created directly inside the namespace open as
/// `peer_ns_fd` (so it never shows up here), both with `mtu`.
pub(super) async fn add_veth_into(
    h: &Handle,
    name: &str,
    peer: &str,
    peer_ns_fd: std::os::fd::RawFd,
    mtu: u32,
) -> Result<(), rtnetlink::Error> {
    let peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
        .name(peer.to_string())
        .mtu(mtu)
        .setns_by_fd(peer_ns_fd)
        .build();
    let msg = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
        .name(name.to_string())
        .mtu(mtu)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
        .build();
    h.link().add(msg).execute().await
}

/// Create a veth pair `name` ↔ `peer`, both in this namespace, both with `mtu`.
pub(super) async fn add_veth_pair(
    h: &Handle,
    name: &str,
    peer: &str,
    mtu: u32,
) -> Result<(), rtnetlink::Error> {
    let peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
        .name(peer.to_string())
        .mtu(mtu)
        .build();
    let msg = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
        .name(name.to_string())
        .mtu(mtu)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
        .build();
    h.link().add(msg).execute().await
}

/// Create a bridge called `name` with `mtu`, up.
pub(super) async fn add_bridge(h: &Handle, name: &str, mtu: u32) -> Result<(), rtnetlink::Error> {
    h.link()
        .add(rtnetlink::LinkBridge::new(name).mtu(mtu).build())
        .execute()
        .await
}

/// `ip route add 224.0.0.0/4 dev <index> scope link`; an existing route is fine.
pub(super) async fn add_multicast_route(
    h: &Handle,
    index: u32,
    iface: &str,
) -> Result<(), BridgeError> {
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(Ipv4Addr::new(224, 0, 0, 0), 4)
        .output_interface(index)
        .scope(RouteScope::Link)
        .protocol(RouteProtocol::Boot)
        .build();
    match h.route().add(route).execute().await {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
        Err(e) => Err(nl_error("add multicast route via", iface, e)),
    }
}
