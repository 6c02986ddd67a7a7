//! The `weave` bridge and the container interfaces plugged into it (shell; the only module that
//! talks rtnetlink or enters network namespaces).
//!
//! Layout (spec router §5.1, sleeve type): a Linux bridge `weave` in the host namespace; per
//! attached container a veth pair `vethwepl<PID>` (host end, enslaved to the bridge, hairpin on)
//! ↔ `ethwe` (inside the container's namespace). Exposed host addresses live on the bridge.
//! The sleeve's capture pair `vethwe-bridge` (a bridge port, hairpin off) ↔ `vethwe-pcap` (where
//! the router captures and injects, see `crate::capture`) comes from
//! [`Bridge::ensure_capture_port`].
//!
//! [`Bridge`] must be used from tokio threads that are in the namespace that owns the bridge
//! (the host's, in production): its netlink socket, its ethtool/ARP sockets and its `/proc/sys/net`
//! writes all act in the namespace of the thread that makes them. Work inside a container runs on
//! a dedicated thread (see `netns`).

mod netns;
mod nl;
mod sys;

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use rtnetlink::packet_route::link::{InfoKind, LinkMessage};
use rtnetlink::Handle;

use crate::addr::Ipv4Cidr;
use crate::api_types::{AttachResponse, InterfaceInfo};

/// Name of the container end of the veth pair.
pub const CONTAINER_IFNAME: &str = "ethwe";
/// Prefix of the host end of a container's veth pair (`vethwepl<PID>`).
pub const HOST_VETH_PREFIX: &str = "vethwepl";
/// Default bridge MTU when the bridge exists but its MTU cannot be read.
pub const DEFAULT_MTU: u32 = 1376;
/// Bridge end of the sleeve capture pair (a port of the bridge, hairpin off).
pub const CAPTURE_PORT_IFNAME: &str = "vethwe-bridge";
/// Router end of the sleeve capture pair: where the router captures and injects frames.
pub const CAPTURE_IFNAME: &str = "vethwe-pcap";
/// Other links this project may create (sleeve capture pair, fastdp); removed by `destroy`.
const OTHER_WEAVE_LINKS: [&str; 3] = [CAPTURE_PORT_IFNAME, CAPTURE_IFNAME, "vethwe-datapath"];
/// How long attach waits for `ethwe` and its bridge port to become operational.
const RUNNING_WAIT: Duration = Duration::from_secs(2);
/// Polling interval of those waits.
const POLL: Duration = Duration::from_millis(2);
/// Linux limit on interface names (IFNAMSIZ - 1).
const MAX_IFNAME_LEN: usize = 15;

/// A 48-bit Ethernet address, shown as `7e:21:4a:70:2f:45`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("invalid container pid {0}: must be greater than 0")]
    InvalidPid(i32),
    #[error("container process {pid} does not exist")]
    NoSuchProcess { pid: i32 },
    #[error("Container is running in the host network namespace")]
    HostNetns { pid: i32 },
    #[error("invalid MTU {0}: must be between 68 and 65535")]
    InvalidMtu(u32),
    #[error("bridge {name} does not exist")]
    NoBridge { name: String },
    #[error("{name} exists but is not a bridge: please do 'weave reset'")]
    NotABridge { name: String },
    #[error("{name} exists but is not a veth: please do 'weave reset'")]
    NotAVeth { name: String },
    #[error("hairpin mode is on for {name}: injected frames would be reflected")]
    Hairpin { name: String },
    #[error("interface {iface} has no MAC address")]
    NoMac { iface: String },
    #[error("container process {pid} has no {CONTAINER_IFNAME} interface")]
    NoContainerInterface { pid: i32 },
    #[error("{op} {target}: {source}")]
    Io {
        op: &'static str,
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("{op} {iface}: {source}")]
    Netlink {
        op: &'static str,
        iface: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("the bridge must be driven from inside a tokio runtime")]
    NoRuntime,
    #[error("the worker thread for the network namespace of pid {pid} died")]
    NetnsThread { pid: i32 },
}

/// `vethwepl<pid>`, cut to the 15 characters Linux allows.
pub fn host_veth_name(pid: i32) -> String {
    let mut name = format!("{HOST_VETH_PREFIX}{pid}");
    name.truncate(MAX_IFNAME_LEN);
    name
}

/// Is this one of the links `weave reset` removes (besides the bridge itself)?
fn is_weave_link(name: &str) -> bool {
    name.starts_with(HOST_VETH_PREFIX) || OTHER_WEAVE_LINKS.contains(&name)
}

/// Owner of the `weave` bridge in the namespace it was created in.
pub struct Bridge {
    name: String,
    handle: Handle,
    driver: tokio::task::JoinHandle<()>,
    home: netns::NsId,
    mtu: Option<u32>,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl fmt::Debug for Bridge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bridge")
            .field("name", &self.name)
            .field("mtu", &self.mtu)
            .finish_non_exhaustive()
    }
}

/// What to do inside the container on attach.
struct ContainerSetup {
    addrs: Vec<Ipv4Cidr>,
    no_multicast_route: bool,
    keep_tx_on: bool,
}

impl Bridge {
    /// Open a netlink connection in the calling thread's namespace for the bridge `name` (inside
    /// a tokio runtime, else [`BridgeError::NoRuntime`]). Does not touch the bridge yet (see
    /// [`Bridge::ensure`]).
    pub fn new(name: &str) -> Result<Self, BridgeError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| BridgeError::NoRuntime)?;
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|source| BridgeError::Io {
                op: "open netlink socket for",
                target: name.to_string(),
                source,
            })?;
        let driver = runtime.spawn(connection);
        Ok(Bridge {
            name: name.to_string(),
            handle,
            driver,
            home: netns::current()?,
            mtu: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Create the bridge if missing (an existing one is reused), set its MTU, bring it up and
    /// return its MAC (the peer name). A new bridge gets its MAC pinned so that it does not
    /// follow its ports.
    pub async fn ensure(&mut self, mtu: u32) -> Result<MacAddr, BridgeError> {
        if !(68..=65535).contains(&mtu) {
            return Err(BridgeError::InvalidMtu(mtu));
        }
        let name = self.name.clone();
        let link = match nl::link_by_name(&self.handle, &name).await? {
            Some(link) => {
                if nl::link_kind(&link) != Some(&InfoKind::Bridge) {
                    return Err(BridgeError::NotABridge { name });
                }
                tracing::debug!(bridge = %name, "reusing existing bridge");
                link
            }
            None => self.create(mtu).await?,
        };
        let index = link.header.index;
        if nl::link_mtu(&link) != Some(mtu) {
            // A bridge's MTU may not exceed its smallest port's on old kernels; attach retries.
            if let Err(e) = nl::set_mtu(&self.handle, index, mtu, &name).await {
                tracing::warn!(bridge = %name, mtu, error = %e, "cannot set bridge MTU yet");
            }
        }
        if !nl::is_up(&link) {
            nl::set_up(&self.handle, index, &name).await?;
        }
        tune_sysctls(&name);
        self.mtu = Some(mtu);
        let link = self.bridge_link().await?;
        nl::link_mac(&link).ok_or(BridgeError::NoMac { iface: name })
    }

    async fn create(&self, mtu: u32) -> Result<LinkMessage, BridgeError> {
        let name = &self.name;
        match nl::add_bridge(&self.handle, name, mtu).await {
            Ok(()) => {}
            // Someone else created it meanwhile: reuse theirs.
            Err(e) if nl::errno(&e) == Some(nl::EEXIST) => {}
            Err(e) => return Err(nl::nl_error("create bridge", name, e)),
        }
        let link = self.bridge_link().await?;
        if nl::link_kind(&link) != Some(&InfoKind::Bridge) {
            return Err(BridgeError::NotABridge { name: name.clone() });
        }
        // Setting the address explicitly stops the kernel from re-deriving it from the ports.
        if let Some(mac) = nl::link_mac(&link) {
            nl::set_mac(&self.handle, link.header.index, mac, name).await?;
        }
        tracing::info!(bridge = %name, mtu, "created bridge");
        Ok(link)
    }

    async fn bridge_link(&self) -> Result<LinkMessage, BridgeError> {
        nl::link_by_name(&self.handle, &self.name)
            .await?
            .ok_or_else(|| BridgeError::NoBridge {
                name: self.name.clone(),
            })
    }

    /// Sleeve mode (spec router §5.1–5.2): make sure the capture pair [`CAPTURE_PORT_IFNAME`]
    /// (a bridge port, up, hairpin off) ↔ [`CAPTURE_IFNAME`] (the router's end, up) exists with
    /// the bridge MTU, and turn TX checksum offload off on the bridge itself so that frames the
    /// host sends carry complete checksums when captured. Idempotent; call after
    /// [`Bridge::ensure`].
    pub async fn ensure_capture_port(&self) -> Result<(), BridgeError> {
        let bridge = self.bridge_link().await?;
        let bridge_index = bridge.header.index;
        let mtu = self.mtu.or(nl::link_mtu(&bridge)).unwrap_or(DEFAULT_MTU);
        let port = match nl::link_by_name(&self.handle, CAPTURE_PORT_IFNAME).await? {
            Some(link) => link,
            None => {
                match nl::add_veth_pair(&self.handle, CAPTURE_PORT_IFNAME, CAPTURE_IFNAME, mtu)
                    .await
                {
                    Ok(()) => tracing::info!(
                        mtu,
                        "created capture pair {CAPTURE_PORT_IFNAME} ↔ {CAPTURE_IFNAME}"
                    ),
                    // Someone else created it meanwhile: reuse theirs.
                    Err(e) if nl::errno(&e) == Some(nl::EEXIST) => {}
                    Err(e) => return Err(nl::nl_error("create veth", CAPTURE_PORT_IFNAME, e)),
                }
                self.existing_link(CAPTURE_PORT_IFNAME).await?
            }
        };
        let pcap = self.existing_link(CAPTURE_IFNAME).await?;
        for link in [&port, &pcap] {
            if nl::link_kind(link) != Some(&InfoKind::Veth) {
                let name = nl::link_name(link).unwrap_or_default().to_string();
                return Err(BridgeError::NotAVeth { name });
            }
        }
        for (link, name) in [(&port, CAPTURE_PORT_IFNAME), (&pcap, CAPTURE_IFNAME)] {
            if nl::link_mtu(link) != Some(mtu) {
                nl::set_mtu(&self.handle, link.header.index, mtu, name).await?;
            }
            write_sysctl(&format!("/proc/sys/net/ipv6/conf/{name}/accept_ra"), "0");
        }
        let port_index = port.header.index;
        nl::enslave_up(&self.handle, port_index, bridge_index, CAPTURE_PORT_IFNAME).await?;
        // Hairpin would send injected frames straight back to the capture.
        nl::set_hairpin(&self.handle, port_index, false, CAPTURE_PORT_IFNAME).await?;
        if !nl::is_up(&pcap) {
            nl::set_up(&self.handle, pcap.header.index, CAPTURE_IFNAME).await?;
        }
        sys::set_tx_checksum(&self.name, false).map_err(|source| BridgeError::Io {
            op: "turn off TX checksum offload on",
            target: self.name.clone(),
            source,
        })?;
        if !self.wait_forwarding(CAPTURE_PORT_IFNAME).await? {
            tracing::warn!(
                port = CAPTURE_PORT_IFNAME,
                "bridge port is not forwarding yet"
            );
        }
        let port = self.existing_link(CAPTURE_PORT_IFNAME).await?;
        if nl::hairpin(&port) == Some(true) {
            return Err(BridgeError::Hairpin {
                name: CAPTURE_PORT_IFNAME.to_string(),
            });
        }
        // The bridge may have refused its MTU while it had no port.
        self.recheck_mtu().await;
        Ok(())
    }

    /// The link `name`, which must exist.
    async fn existing_link(&self, name: &str) -> Result<LinkMessage, BridgeError> {
        nl::link_by_name(&self.handle, name)
            .await?
            .ok_or_else(|| BridgeError::Io {
                op: "find link",
                target: name.to_string(),
                source: io::ErrorKind::NotFound.into(),
            })
    }

    /// Give the container whose process is `pid` an `ethwe` interface on the bridge with (at
    /// least) `addrs`. Idempotent: an existing `ethwe` only gets the missing addresses. The
    /// multicast route, which containers wait for, is added last.
    pub async fn attach(
        &self,
        pid: i32,
        addrs: &[Ipv4Cidr],
        no_multicast_route: bool,
        keep_tx_on: bool,
    ) -> Result<AttachResponse, BridgeError> {
        let (ns, ns_id) = netns::open_pid(pid)?;
        if ns_id == self.home {
            return Err(BridgeError::HostNetns { pid });
        }
        let bridge = self.bridge_link().await?;
        let bridge_index = bridge.header.index;
        let mtu = self.mtu.or(nl::link_mtu(&bridge)).unwrap_or(DEFAULT_MTU);
        let host_name = host_veth_name(pid);

        // Two rounds at most: the second after removing a stale host end whose container end
        // is gone.
        for _ in 0..2 {
            let created = self
                .ensure_host_end(&host_name, bridge_index, &ns, mtu, keep_tx_on)
                .await?;

            let setup = ContainerSetup {
                addrs: addrs.to_vec(),
                no_multicast_route,
                keep_tx_on,
            };
            let result = self.configure_container(&ns, pid, &host_name, setup).await;
            match result {
                Ok(response) => {
                    self.recheck_mtu().await;
                    tracing::info!(pid, mac = %response.mac, addrs = ?response.addrs, "attached container");
                    return Ok(response);
                }
                Err(BridgeError::NoContainerInterface { .. }) if !created => {
                    // A leftover host end from a container that is gone: start afresh.
                    if let Some(host) = nl::link_by_name(&self.handle, &host_name).await? {
                        tracing::info!(pid, veth = %host_name, "removing stale veth");
                        nl::del_link(&self.handle, host.header.index, &host_name).await?;
                        continue;
                    }
                    return Err(BridgeError::NoContainerInterface { pid });
                }
                Err(e) => {
                    if created {
                        if let Some(host) = nl::link_by_name(&self.handle, &host_name).await? {
                            self.remove_host_end(host.header.index, &host_name).await;
                        }
                    }
                    return Err(e);
                }
            }
        }
        Err(BridgeError::NoContainerInterface { pid })
    }

    /// Configure `ethwe` inside the container in two steps: addresses and link up; then, once
    /// the bridge forwards for the host end (the kernel enables the port asynchronously, and
    /// frames sent before are dropped), gratuitous ARPs and the multicast route.
    async fn configure_container(
        &self,
        ns: &File,
        pid: i32,
        host_name: &str,
        setup: ContainerSetup,
    ) -> Result<AttachResponse, BridgeError> {
        let ContainerSetup {
            addrs,
            no_multicast_route,
            keep_tx_on,
        } = setup;
        let added = netns::run_in(dup(ns, pid)?, pid, move |h| {
            prepare_container(h, pid, addrs, keep_tx_on)
        })
        .await?;
        if !self.wait_forwarding(host_name).await? {
            tracing::warn!(veth = %host_name, "bridge port is not forwarding yet");
        }
        netns::run_in(dup(ns, pid)?, pid, move |h| {
            finish_container(h, pid, added, no_multicast_route)
        })
        .await
    }

    /// Poll until the bridge port `host_name` forwards; `Ok(false)` when it does not within
    /// [`RUNNING_WAIT`] or is not ours (an `ethwe` made by someone else).
    async fn wait_forwarding(&self, host_name: &str) -> Result<bool, BridgeError> {
        let deadline = tokio::time::Instant::now() + RUNNING_WAIT;
        loop {
            let Some(link) = nl::link_by_name(&self.handle, host_name).await? else {
                return Ok(false);
            };
            if nl::is_forwarding_port(&link) {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Make sure the host end `host_name` exists, is on the bridge and up. Creates the pair
    /// (with `ethwe` made directly inside the namespace `ns`) when missing; returns whether it
    /// did. When the container already has an `ethwe` (EEXIST) there is nothing to create.
    async fn ensure_host_end(
        &self,
        host_name: &str,
        bridge_index: u32,
        ns: &File,
        mtu: u32,
        keep_tx_on: bool,
    ) -> Result<bool, BridgeError> {
        if let Some(host) = nl::link_by_name(&self.handle, host_name).await? {
            self.plug(host.header.index, bridge_index, host_name, keep_tx_on)
                .await?;
            return Ok(false);
        }
        match nl::add_veth_into(
            &self.handle,
            host_name,
            CONTAINER_IFNAME,
            ns.as_raw_fd(),
            mtu,
        )
        .await
        {
            Ok(()) => {}
            Err(e) if nl::errno(&e) == Some(nl::EEXIST) => {
                tracing::debug!(veth = %host_name, "container already has {CONTAINER_IFNAME}");
                return Ok(false);
            }
            Err(e) => return Err(nl::nl_error("create veth", host_name, e)),
        }
        let host = nl::link_by_name(&self.handle, host_name)
            .await?
            .ok_or_else(|| BridgeError::Io {
                op: "find new veth",
                target: host_name.to_string(),
                source: io::ErrorKind::NotFound.into(),
            })?;
        if let Err(e) = self
            .plug(host.header.index, bridge_index, host_name, keep_tx_on)
            .await
        {
            self.remove_host_end(host.header.index, host_name).await;
            return Err(e);
        }
        Ok(true)
    }

    /// Enslave the host end to the bridge, hairpin on, up, TX checksum offload off.
    async fn plug(
        &self,
        index: u32,
        bridge_index: u32,
        host_name: &str,
        keep_tx_on: bool,
    ) -> Result<(), BridgeError> {
        nl::enslave_up(&self.handle, index, bridge_index, host_name).await?;
        if let Err(e) = nl::set_hairpin(&self.handle, index, true, host_name).await {
            tracing::warn!(veth = %host_name, error = %e, "cannot turn on hairpin mode");
        }
        if !keep_tx_on {
            sys::set_tx_checksum(host_name, false).map_err(|source| BridgeError::Io {
                op: "turn off TX checksum offload on",
                target: host_name.to_string(),
                source,
            })?;
        }
        write_sysctl(
            &format!("/proc/sys/net/ipv6/conf/{host_name}/accept_ra"),
            "0",
        );
        Ok(())
    }

    async fn remove_host_end(&self, index: u32, host_name: &str) {
        if let Err(e) = nl::del_link(&self.handle, index, host_name).await {
            tracing::warn!(veth = %host_name, error = %e, "cannot clean up veth");
        }
    }

    /// The bridge may have refused its MTU while it had no port; try again now it has one.
    async fn recheck_mtu(&self) {
        let Some(want) = self.mtu else { return };
        match self.bridge_link().await {
            Ok(link) if nl::link_mtu(&link) != Some(want) => {
                if let Err(e) = nl::set_mtu(&self.handle, link.header.index, want, &self.name).await
                {
                    tracing::warn!(bridge = %self.name, mtu = want, error = %e, "cannot set bridge MTU");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read bridge"),
        }
    }

    /// Remove `addrs` (matched by IP; all of them when empty) from the container's `ethwe`;
    /// when no address is left the veth goes. Returns the addresses removed.
    pub async fn detach(&self, pid: i32, addrs: &[Ipv4Cidr]) -> Result<Vec<Ipv4Cidr>, BridgeError> {
        let (ns, ns_id) = netns::open_pid(pid)?;
        if ns_id == self.home {
            return Err(BridgeError::HostNetns { pid });
        }
        let addrs = addrs.to_vec();
        let removed = netns::run_in(ns, pid, move |h| teardown_container(h, addrs)).await?;
        let shown: Vec<String> = removed.iter().map(ToString::to_string).collect();
        tracing::info!(pid, removed = ?shown, "detached container");
        Ok(removed)
    }

    /// The container's `ethwe` (MAC and addresses), or `None` when it has none or is gone.
    pub async fn interface(&self, pid: i32) -> Result<Option<InterfaceInfo>, BridgeError> {
        let ns = match netns::open_pid(pid) {
            Ok((_, id)) if id == self.home => return Ok(None),
            Ok((ns, _)) => ns,
            Err(BridgeError::NoSuchProcess { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        netns::run_in(ns, pid, |h| async move {
            match nl::link_by_name(&h, CONTAINER_IFNAME).await? {
                Some(link) => describe(&h, &link, CONTAINER_IFNAME).await.map(Some),
                None => Ok(None),
            }
        })
        .await
    }

    /// The bridge's MAC and addresses (`weave ps weave:expose`); `None` when there is no bridge.
    pub async fn bridge_interface(&self) -> Result<Option<InterfaceInfo>, BridgeError> {
        match nl::link_by_name(&self.handle, &self.name).await? {
            Some(link) => describe(&self.handle, &link, &self.name).await.map(Some),
            None => Ok(None),
        }
    }

    /// The first IPv4 address of another link (Docker's bridge, `docker0`); `None` when that
    /// link or its address is absent.
    pub async fn link_ipv4(&self, name: &str) -> Result<Option<std::net::Ipv4Addr>, BridgeError> {
        let Some(link) = nl::link_by_name(&self.handle, name).await? else {
            return Ok(None);
        };
        let addrs = nl::ipv4_addrs(&self.handle, link.header.index, name).await?;
        Ok(addrs.first().map(|(cidr, _)| cidr.addr))
    }

    /// The IPv4 addresses on the bridge.
    pub async fn bridge_addrs(&self) -> Result<Vec<Ipv4Cidr>, BridgeError> {
        let link = self.bridge_link().await?;
        let addrs = nl::ipv4_addrs(&self.handle, link.header.index, &self.name).await?;
        Ok(addrs.into_iter().map(|(cidr, _)| cidr).collect())
    }

    /// Put `cidr` on the bridge (already there → fine) and announce it.
    pub async fn expose(&self, cidr: Ipv4Cidr) -> Result<(), BridgeError> {
        let link = self.bridge_link().await?;
        let index = link.header.index;
        if nl::add_addr(&self.handle, index, cidr, &self.name).await? {
            if let Some(mac) = nl::link_mac(&link) {
                announce(index, mac, &[cidr], &self.name);
            }
            tracing::info!(bridge = %self.name, %cidr, "exposed");
        }
        Ok(())
    }

    /// Take `cidr` off the bridge; `Ok(false)` when it was not there (or there is no bridge).
    pub async fn hide(&self, cidr: Ipv4Cidr) -> Result<bool, BridgeError> {
        let Some(link) = nl::link_by_name(&self.handle, &self.name).await? else {
            return Ok(false);
        };
        let addrs = nl::ipv4_addrs(&self.handle, link.header.index, &self.name).await?;
        let mut removed = false;
        for (have, msg) in addrs {
            if have == cidr {
                removed |= nl::del_addr(&self.handle, msg, &self.name).await?;
            }
        }
        if removed {
            tracing::info!(bridge = %self.name, %cidr, "hidden");
        }
        Ok(removed)
    }

    /// `weave reset`: delete the bridge and every weave veth left in this namespace. Returns
    /// the names of the links deleted.
    pub async fn destroy(&self) -> Result<Vec<String>, BridgeError> {
        let mut deleted = Vec::new();
        for link in nl::all_links(&self.handle).await? {
            let Some(name) = nl::link_name(&link) else {
                continue;
            };
            if name == self.name || is_weave_link(name) {
                let name = name.to_string();
                nl::del_link(&self.handle, link.header.index, &name).await?;
                deleted.push(name);
            }
        }
        if !deleted.is_empty() {
            tracing::info!(links = ?deleted, "deleted weave links");
        }
        Ok(deleted)
    }

    /// The bridge's MAC, or `None` when there is no bridge.
    pub async fn mac(&self) -> Result<Option<MacAddr>, BridgeError> {
        Ok(nl::link_by_name(&self.handle, &self.name)
            .await?
            .as_ref()
            .and_then(nl::link_mac))
    }
}

/// MAC and IPv4 addresses of `link`.
async fn describe(
    h: &Handle,
    link: &LinkMessage,
    iface: &str,
) -> Result<InterfaceInfo, BridgeError> {
    let mac = nl::link_mac(link).ok_or_else(|| BridgeError::NoMac {
        iface: iface.to_string(),
    })?;
    let addrs = nl::ipv4_addrs(h, link.header.index, iface).await?;
    Ok(InterfaceInfo {
        mac: mac.to_string(),
        addrs: addrs.iter().map(|(cidr, _)| cidr.to_string()).collect(),
    })
}

/// Runs inside the container's namespace: TX offload, sysctls, missing addresses, link up
/// (spec router §5.3). Returns the addresses it added.
async fn prepare_container(
    h: Handle,
    pid: i32,
    addrs: Vec<Ipv4Cidr>,
    keep_tx_on: bool,
) -> Result<Vec<Ipv4Cidr>, BridgeError> {
    let link = nl::link_by_name(&h, CONTAINER_IFNAME)
        .await?
        .ok_or(BridgeError::NoContainerInterface { pid })?;
    let index = link.header.index;
    if !keep_tx_on {
        sys::set_tx_checksum(CONTAINER_IFNAME, false).map_err(|source| BridgeError::Io {
            op: "turn off TX checksum offload on ethwe of pid",
            target: pid.to_string(),
            source,
        })?;
    }
    tune_sysctls(CONTAINER_IFNAME);
    let existing = nl::ipv4_addrs(&h, index, CONTAINER_IFNAME).await?;
    let mut added = Vec::new();
    for cidr in addrs {
        if existing.iter().any(|(have, _)| *have == cidr) {
            continue;
        }
        if nl::add_addr(&h, index, cidr, CONTAINER_IFNAME).await? {
            added.push(cidr);
        }
    }
    if !nl::is_up(&link) {
        nl::set_up(&h, index, CONTAINER_IFNAME).await?;
    }
    // The kernel activates the carrier asynchronously; frames sent before are dropped.
    if !wait_running(&h, pid).await? {
        tracing::warn!(pid, "{CONTAINER_IFNAME} is not operationally up yet");
    }
    Ok(added)
}

/// Runs inside the container's namespace once the bridge forwards: announce the new addresses,
/// then, last, the multicast route `weavewait` in the container waits for.
async fn finish_container(
    h: Handle,
    pid: i32,
    added: Vec<Ipv4Cidr>,
    no_multicast_route: bool,
) -> Result<AttachResponse, BridgeError> {
    let link = nl::link_by_name(&h, CONTAINER_IFNAME)
        .await?
        .ok_or(BridgeError::NoContainerInterface { pid })?;
    let index = link.header.index;
    if let Some(mac) = nl::link_mac(&link) {
        announce(index, mac, &added, CONTAINER_IFNAME);
    }
    if !no_multicast_route {
        nl::add_multicast_route(&h, index, CONTAINER_IFNAME).await?;
    }
    let info = describe(&h, &link, CONTAINER_IFNAME).await?;
    Ok(AttachResponse {
        mac: info.mac,
        addrs: info.addrs,
    })
}

/// Another handle on the namespace file, for one more worker thread.
fn dup(ns: &File, pid: i32) -> Result<File, BridgeError> {
    ns.try_clone().map_err(|source| BridgeError::Io {
        op: "duplicate network namespace handle of pid",
        target: pid.to_string(),
        source,
    })
}

/// Poll until `ethwe` is operationally up; `Ok(false)` if it is not within [`RUNNING_WAIT`].
async fn wait_running(h: &Handle, pid: i32) -> Result<bool, BridgeError> {
    let deadline = tokio::time::Instant::now() + RUNNING_WAIT;
    loop {
        let link = nl::link_by_name(h, CONTAINER_IFNAME)
            .await?
            .ok_or(BridgeError::NoContainerInterface { pid })?;
        if nl::is_running(&link) {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Runs inside the container's namespace: remove addresses, and `ethwe` once none is left.
async fn teardown_container(h: Handle, addrs: Vec<Ipv4Cidr>) -> Result<Vec<Ipv4Cidr>, BridgeError> {
    let Some(link) = nl::link_by_name(&h, CONTAINER_IFNAME).await? else {
        return Ok(Vec::new());
    };
    let index = link.header.index;
    let mut removed = Vec::new();
    let mut remaining = 0usize;
    for (have, msg) in nl::ipv4_addrs(&h, index, CONTAINER_IFNAME).await? {
        if addrs.is_empty() || addrs.iter().any(|want| want.addr == have.addr) {
            if nl::del_addr(&h, msg, CONTAINER_IFNAME).await? {
                removed.push(have);
            }
        } else {
            remaining += 1;
        }
    }
    if remaining == 0 {
        nl::del_link(&h, index, CONTAINER_IFNAME).await?;
    }
    Ok(removed)
}

/// Gratuitous ARP for each address, so neighbours forget stale MACs. Best effort.
fn announce(index: u32, mac: MacAddr, addrs: &[Ipv4Cidr], iface: &str) {
    for cidr in addrs {
        if let Err(e) = sys::send_garp(index, mac, cidr.addr) {
            tracing::debug!(%iface, ip = %cidr.addr, error = %e, "gratuitous ARP not sent");
        }
    }
}

/// Per-interface sysctls (spec router §5.2): no IPv6 router advertisements, and quick reaction
/// to MACs moving. Best effort: a missing file (no IPv6) is fine.
fn tune_sysctls(iface: &str) {
    write_sysctl(&format!("/proc/sys/net/ipv6/conf/{iface}/accept_ra"), "0");
    let neigh = format!("/proc/sys/net/ipv4/neigh/{iface}");
    write_sysctl(&format!("{neigh}/base_reachable_time"), "5");
    write_sysctl(&format!("{neigh}/delay_first_probe_time"), "2");
    write_sysctl(&format!("{neigh}/ucast_solicit"), "1");
}

/// Write a `/proc/sys/net` file (acts in the calling thread's namespace). A missing file is
/// ignored; other failures are logged.
fn write_sysctl(path: &str, value: &str) {
    match std::fs::write(path, value) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(%path, error = %e, "cannot write sysctl"),
    }
}

/// Whether TX checksum offload is on for `iface` in the calling thread's namespace (for tests
/// and diagnostics).
pub fn tx_checksum_enabled(iface: &str) -> io::Result<bool> {
    sys::tx_checksum(iface)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_names_fit_ifnamsiz() {
        assert_eq!(host_veth_name(1234), "vethwepl1234");
        assert_eq!(host_veth_name(4_194_304), "vethwepl4194304");
        assert_eq!(host_veth_name(2_147_483_647).len(), 15);
    }

    #[test]
    fn mac_display() {
        let mac = MacAddr([0x7e, 0x21, 0x4a, 0x70, 0x2f, 0x05]);
        assert_eq!(mac.to_string(), "7e:21:4a:70:2f:05");
    }

    #[test]
    fn weave_links() {
        assert!(is_weave_link("vethwepl123"));
        assert!(is_weave_link("vethwe-pcap"));
        assert!(!is_weave_link("veth0"));
        assert!(!is_weave_link("eth0"));
    }
}
