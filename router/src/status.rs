//! `weave status` text, its sub-views and the `/report` JSON (pure). Spec ipam-dns-cli §3.4 and
//! router §6.2/§6.3; field names follow Weave's Go structs so `weave report -f` templates keep
//! working.
//!
//! Everything is rendered from a [`StatusSnapshot`], a plain value the owners of the state
//! publish (today: the router's static facts; next: the mesh fills peers, connections, targets
//! and routes).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use serde_json::{json, Value};

pub use crate::capture::CaptureStats;

/// Shown after the version: we never phone home.
pub const VERSION_CHECK_DISABLED: &str = "version check update disabled";

/// Everything `/status*` and `/report` show.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusSnapshot {
    /// False while components are still starting (until the data plane's capture is open) and
    /// once one has failed: `/status*` then answer 503.
    pub ready: bool,
    /// The part of the router that ended (the router is on its way out, to be restarted).
    pub failed: Option<String>,
    /// Release string, e.g. `2.8.1`.
    pub version: String,
    pub router: RouterStatus,
    /// Present when the Docker API proxy runs.
    pub proxy: Option<ProxyStatus>,
}

/// The `Router` object of the report (Go `mesh.Status` + weave's extras).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouterStatus {
    #[serde(rename = "Protocol")]
    pub protocol: String,
    #[serde(rename = "ProtocolMinVersion")]
    pub protocol_min_version: u8,
    #[serde(rename = "ProtocolMaxVersion")]
    pub protocol_max_version: u8,
    #[serde(rename = "Encryption")]
    pub encryption: bool,
    #[serde(rename = "PeerDiscovery")]
    pub peer_discovery: bool,
    /// Our peer name (the bridge MAC).
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "NickName")]
    pub nickname: String,
    #[serde(rename = "Port")]
    pub port: u16,
    /// Every known peer, ourselves included.
    #[serde(rename = "Peers")]
    pub peers: Vec<PeerStatus>,
    #[serde(rename = "UnicastRoutes")]
    pub unicast_routes: Vec<UnicastRoute>,
    #[serde(rename = "BroadcastRoutes")]
    pub broadcast_routes: Vec<BroadcastRoute>,
    /// Live connections, then targets not connected (as Weave lists them).
    #[serde(rename = "Connections")]
    pub connections: Vec<ConnectionStatus>,
    #[serde(rename = "TerminationCount")]
    pub termination_count: u64,
    #[serde(rename = "Targets")]
    pub targets: Vec<String>,
    #[serde(rename = "TrustedSubnets")]
    pub trusted_subnets: Vec<String>,
    /// The capture interface (`vethwe-pcap (via pcap)` once the sleeve runs).
    #[serde(rename = "Interface")]
    pub interface: String,
    /// libpcap's counters of the sleeve's capture; `None` (JSON null) before it runs.
    #[serde(rename = "CaptureStats")]
    pub capture_stats: Option<CaptureStats>,
    /// The sleeve's own counters (not in Weave's report); absent before it runs.
    #[serde(rename = "Sleeve", skip_serializing_if = "Option::is_none")]
    pub sleeve: Option<SleeveCounters>,
}

/// Counters of the sleeve data plane shown in the report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SleeveCounters {
    /// MAC cache entries evicted because the cache was full.
    pub macs_evicted: u64,
    /// ICMP replies the router did not send (rate limit).
    pub icmp_rate_limited: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeerStatus {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "NickName")]
    pub nickname: String,
    #[serde(rename = "UID")]
    pub uid: u64,
    #[serde(rename = "ShortID")]
    pub short_id: u16,
    #[serde(rename = "Version")]
    pub version: u64,
    #[serde(rename = "Connections")]
    pub connections: Vec<PeerConnection>,
}

/// One entry of a peer's connection list (as gossiped).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeerConnection {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "NickName")]
    pub nickname: String,
    #[serde(rename = "Address")]
    pub address: String,
    #[serde(rename = "Outbound")]
    pub outbound: bool,
    #[serde(rename = "Established")]
    pub established: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionState {
    Established,
    Pending,
    Retrying,
    Failed,
    Connecting,
}

impl ConnectionState {
    /// The order Weave prints counts in.
    pub const ALL: [ConnectionState; 5] = [
        ConnectionState::Established,
        ConnectionState::Pending,
        ConnectionState::Retrying,
        ConnectionState::Failed,
        ConnectionState::Connecting,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionState::Established => "established",
            ConnectionState::Pending => "pending",
            ConnectionState::Retrying => "retrying",
            ConnectionState::Failed => "failed",
            ConnectionState::Connecting => "connecting",
        }
    }
}

/// One of our connections or targets.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConnectionStatus {
    #[serde(rename = "Address")]
    pub address: String,
    #[serde(rename = "Outbound")]
    pub outbound: bool,
    #[serde(rename = "State")]
    pub state: ConnectionState,
    /// e.g. `unencrypted sleeve 7e:21:4a:70:2f:45(host1)`, or the error of a failed target.
    #[serde(rename = "Info")]
    pub info: String,
    /// `None` for targets (JSON null, as Weave).
    #[serde(rename = "Attrs")]
    pub attrs: Option<BTreeMap<String, Value>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UnicastRoute {
    #[serde(rename = "Dest")]
    pub dest: String,
    #[serde(rename = "Via")]
    pub via: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BroadcastRoute {
    #[serde(rename = "Source")]
    pub source: String,
    #[serde(rename = "Via")]
    pub via: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProxyStatus {
    #[serde(rename = "Addresses")]
    pub addresses: Vec<String>,
}

impl RouterStatus {
    /// A router alone: protocol `weave 1..2`, no encryption, discovery on, itself as the only
    /// peer, no connections or targets.
    pub fn alone(name: &str, nickname: &str, port: u16, uid: u64, short_id: u16) -> Self {
        RouterStatus {
            protocol: "weave".to_string(),
            protocol_min_version: 1,
            protocol_max_version: 2,
            encryption: false,
            peer_discovery: true,
            name: name.to_string(),
            nickname: nickname.to_string(),
            port,
            peers: vec![PeerStatus {
                name: name.to_string(),
                nickname: nickname.to_string(),
                uid,
                short_id,
                version: 0,
                connections: Vec::new(),
            }],
            unicast_routes: Vec::new(),
            broadcast_routes: Vec::new(),
            connections: Vec::new(),
            termination_count: 0,
            targets: Vec::new(),
            trusted_subnets: Vec::new(),
            interface: String::new(),
            capture_stats: None,
            sleeve: None,
        }
    }
}

/// `Label: value` with the colon at column 16.
fn field(out: &mut String, label: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "{label:>15}: {value}");
}

fn on_off(enabled: bool) -> &'static str {
    if enabled {
        "enabled"
    } else {
        "disabled"
    }
}

/// Go's `printList`: `none` or comma-separated.
fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_string()
    } else {
        items.join(", ")
    }
}

/// `2 established, 1 failed`: non-zero counts in `order`, or empty.
fn counts(pairs: &[(&str, usize)]) -> String {
    pairs
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(label, n)| format!("{n} {label}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn connection_counts(conns: &[ConnectionStatus]) -> String {
    let pairs: Vec<(&str, usize)> = ConnectionState::ALL
        .iter()
        .map(|s| (s.as_str(), conns.iter().filter(|c| c.state == *s).count()))
        .collect();
    counts(&pairs)
}

fn peer_connection_counts(peers: &[PeerStatus]) -> String {
    let all = peers.iter().flat_map(|p| &p.connections);
    let established = all.clone().filter(|c| c.established).count();
    let pending = all.filter(|c| !c.established).count();
    counts(&[("established", established), ("pending", pending)])
}

/// `GET /status`: the text `weave status` prints (the CLI adds the blank lines around it).
pub fn render_status(s: &StatusSnapshot) -> String {
    render_status_with(s, &[])
}

/// [`render_status`] with more services' blocks (IPAM's) between the router's and the proxy's.
pub fn render_status_with(s: &StatusSnapshot, sections: &[String]) -> String {
    let r = &s.router;
    let mut out = String::new();
    field(
        &mut out,
        "Version",
        format!("{} ({VERSION_CHECK_DISABLED})", s.version),
    );
    if !s.ready {
        let why = match &s.failed {
            Some(f) => format!("not ready: {f}"),
            None => "not ready: starting".to_string(),
        };
        field(&mut out, "Status", why);
    }
    out.push('\n');
    field(&mut out, "Service", "router");
    let protocol = if r.protocol_min_version == r.protocol_max_version {
        format!("{} {}", r.protocol, r.protocol_max_version)
    } else {
        format!(
            "{} {}..{}",
            r.protocol, r.protocol_min_version, r.protocol_max_version
        )
    };
    field(&mut out, "Protocol", protocol);
    field(&mut out, "Name", format!("{}({})", r.name, r.nickname));
    field(&mut out, "Encryption", on_off(r.encryption));
    field(&mut out, "PeerDiscovery", on_off(r.peer_discovery));
    field(&mut out, "Targets", r.targets.len());
    let conn_counts = connection_counts(&r.connections);
    let conns = if conn_counts.is_empty() {
        r.connections.len().to_string()
    } else {
        format!("{} ({conn_counts})", r.connections.len())
    };
    field(&mut out, "Connections", conns);
    let peer_counts = peer_connection_counts(&r.peers);
    let peers = if peer_counts.is_empty() {
        r.peers.len().to_string()
    } else {
        format!("{} (with {peer_counts} connections)", r.peers.len())
    };
    field(&mut out, "Peers", peers);
    field(&mut out, "TrustedSubnets", list(&r.trusted_subnets));
    for section in sections {
        out.push('\n');
        out.push_str(section);
    }
    if let Some(proxy) = &s.proxy {
        out.push('\n');
        field(&mut out, "Service", "proxy");
        field(&mut out, "Address", list(&proxy.addresses));
    }
    out
}

/// `GET /status/targets`: one target per line.
pub fn render_targets(s: &StatusSnapshot) -> String {
    s.router.targets.iter().map(|t| format!("{t}\n")).collect()
}

fn arrow(outbound: bool) -> &'static str {
    if outbound {
        "->"
    } else {
        "<-"
    }
}

fn attr_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `GET /status/connections`: Weave's layout, except that attributes are separated by a space
/// (`encrypted=true mtu=1376`) where Weave glues them together (`encrypted=truemtu=1376`).
pub fn render_connections(s: &StatusSnapshot) -> String {
    let mut out = String::new();
    for c in &s.router.connections {
        let attrs: Vec<String> = c
            .attrs
            .iter()
            .flatten()
            .filter(|(k, _)| k.as_str() != "name")
            .map(|(k, v)| format!("{k}={}", attr_text(v)))
            .collect();
        let attrs = attrs.join(" ");
        let _ = writeln!(
            out,
            "{} {:<21} {:<11} {} {}",
            arrow(c.outbound),
            c.address,
            c.state.as_str(),
            c.info,
            attrs
        );
    }
    out
}

/// `GET /status/peers`: each peer, then its connections.
pub fn render_peers(s: &StatusSnapshot) -> String {
    let mut out = String::new();
    for p in &s.router.peers {
        let _ = writeln!(out, "{}({})", p.name, p.nickname);
        for c in &p.connections {
            let who = format!("{}({})", c.name, c.nickname);
            let state = if c.established {
                "established"
            } else {
                "pending"
            };
            let _ = writeln!(
                out,
                "   {} {:<21} {:<37} {state}",
                arrow(c.outbound),
                c.address,
                who
            );
        }
    }
    out
}

/// `GET /report`: the JSON Weave's `WeaveStatus` marshals to (disabled components omitted).
pub fn report(s: &StatusSnapshot) -> Value {
    let mut report = serde_json::Map::new();
    report.insert("Ready".into(), Value::Bool(s.ready));
    if let Some(f) = &s.failed {
        report.insert("Failed".into(), Value::String(f.clone()));
    }
    report.insert("Version".into(), Value::String(s.version.clone()));
    report.insert(
        "VersionCheck".into(),
        json!({
            "Enabled": false,
            "Success": false,
            "NewVersion": "",
            "NextCheckAt": "0001-01-01T00:00:00Z",
        }),
    );
    report.insert("Router".into(), json!(s.router));
    if let Some(proxy) = &s.proxy {
        report.insert("Proxy".into(), json!(proxy));
    }
    Value::Object(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alone() -> StatusSnapshot {
        StatusSnapshot {
            ready: true,
            failed: None,
            version: "2.8.1".into(),
            router: RouterStatus::alone("8a:3e:3e:3e:3e:3e", "nicknamington", 6783, 42, 7),
            proxy: None,
        }
    }

    #[test]
    fn status_of_a_lone_router() {
        let want = "        Version: 2.8.1 (version check update disabled)

        Service: router
       Protocol: weave 1..2
           Name: 8a:3e:3e:3e:3e:3e(nicknamington)
     Encryption: disabled
  PeerDiscovery: enabled
        Targets: 0
    Connections: 0
          Peers: 1
 TrustedSubnets: none
";
        assert_eq!(render_status(&alone()), want);
    }

    #[test]
    fn status_says_why_not_ready() {
        let mut s = alone();
        s.ready = false;
        let starting = render_status(&s);
        assert!(
            starting.starts_with(
                "        Version: 2.8.1 (version check update disabled)\n         Status: not ready: starting\n\n        Service: router\n"
            ),
            "{starting}"
        );
        s.failed = Some("data plane ended: capture closed".into());
        assert!(render_status(&s)
            .contains("         Status: not ready: data plane ended: capture closed\n"));
        let r = report(&s);
        assert_eq!(r["Ready"], json!(false));
        assert_eq!(r["Failed"], json!("data plane ended: capture closed"));
        assert!(report(&alone()).get("Failed").is_none());
    }

    #[test]
    fn status_with_proxy_and_mesh() {
        let mut s = alone();
        s.proxy = Some(ProxyStatus {
            addresses: vec!["unix:///var/run/weave/weave.sock".into()],
        });
        s.router.targets = vec!["192.168.48.11".into()];
        s.router.trusted_subnets = vec!["10.0.0.0/8".into(), "192.168.0.0/16".into()];
        s.router.connections = vec![ConnectionStatus {
            address: "192.168.48.11:6783".into(),
            outbound: true,
            state: ConnectionState::Established,
            info: "unencrypted sleeve 7e:21:4a:70:2f:45(host1)".into(),
            attrs: Some(BTreeMap::from([
                ("mtu".to_string(), json!(1414)),
                ("name".to_string(), json!("sleeve")),
            ])),
        }];
        s.router.peers[0].connections.push(PeerConnection {
            name: "7e:21:4a:70:2f:45".into(),
            nickname: "host1".into(),
            address: "192.168.48.11:6783".into(),
            outbound: true,
            established: true,
        });
        s.router.peers.push(PeerStatus {
            name: "7e:21:4a:70:2f:45".into(),
            nickname: "host1".into(),
            uid: 1,
            short_id: 2,
            version: 3,
            connections: vec![PeerConnection {
                name: "8a:3e:3e:3e:3e:3e".into(),
                nickname: "nicknamington".into(),
                address: "192.168.48.12:33866".into(),
                outbound: false,
                established: true,
            }],
        });
        let want = "        Version: 2.8.1 (version check update disabled)

        Service: router
       Protocol: weave 1..2
           Name: 8a:3e:3e:3e:3e:3e(nicknamington)
     Encryption: disabled
  PeerDiscovery: enabled
        Targets: 1
    Connections: 1 (1 established)
          Peers: 2 (with 2 established connections)
 TrustedSubnets: 10.0.0.0/8, 192.168.0.0/16

        Service: proxy
        Address: unix:///var/run/weave/weave.sock
";
        assert_eq!(render_status(&s), want);
        assert_eq!(render_targets(&s), "192.168.48.11\n");
        assert_eq!(
            render_connections(&s),
            "-> 192.168.48.11:6783    established unencrypted sleeve 7e:21:4a:70:2f:45(host1) mtu=1414\n"
        );
        assert_eq!(
            render_peers(&s),
            "8a:3e:3e:3e:3e:3e(nicknamington)\n   -> 192.168.48.11:6783    7e:21:4a:70:2f:45(host1)              established\n7e:21:4a:70:2f:45(host1)\n   <- 192.168.48.12:33866   8a:3e:3e:3e:3e:3e(nicknamington)      established\n"
        );
    }

    #[test]
    fn single_protocol_version_and_mixed_counts() {
        let mut s = alone();
        s.router.protocol_min_version = 2;
        let conn = |state| ConnectionStatus {
            address: "10.0.0.1:6783".into(),
            outbound: true,
            state,
            info: String::new(),
            attrs: None,
        };
        s.router.connections = vec![
            conn(ConnectionState::Failed),
            conn(ConnectionState::Established),
            conn(ConnectionState::Failed),
        ];
        let text = render_status(&s);
        assert!(text.contains("       Protocol: weave 2\n"), "{text}");
        assert!(
            text.contains("    Connections: 3 (1 established, 2 failed)\n"),
            "{text}"
        );
    }

    #[test]
    fn empty_sub_views() {
        assert_eq!(render_targets(&alone()), "");
        assert_eq!(render_connections(&alone()), "");
        assert_eq!(render_peers(&alone()), "8a:3e:3e:3e:3e:3e(nicknamington)\n");
    }

    #[test]
    fn report_json() {
        let mut s = alone();
        s.proxy = Some(ProxyStatus {
            addresses: vec!["tcp://0.0.0.0:12375".into()],
        });
        let want = json!({
            "Ready": true,
            "Version": "2.8.1",
            "VersionCheck": {
                "Enabled": false,
                "Success": false,
                "NewVersion": "",
                "NextCheckAt": "0001-01-01T00:00:00Z"
            },
            "Router": {
                "Protocol": "weave",
                "ProtocolMinVersion": 1,
                "ProtocolMaxVersion": 2,
                "Encryption": false,
                "PeerDiscovery": true,
                "Name": "8a:3e:3e:3e:3e:3e",
                "NickName": "nicknamington",
                "Port": 6783,
                "Peers": [{
                    "Name": "8a:3e:3e:3e:3e:3e",
                    "NickName": "nicknamington",
                    "UID": 42,
                    "ShortID": 7,
                    "Version": 0,
                    "Connections": []
                }],
                "UnicastRoutes": [],
                "BroadcastRoutes": [],
                "Connections": [],
                "TerminationCount": 0,
                "Targets": [],
                "TrustedSubnets": [],
                "Interface": "",
                "CaptureStats": null
            },
            "Proxy": { "Addresses": ["tcp://0.0.0.0:12375"] }
        });
        assert_eq!(report(&s), want);
        let top: Vec<String> = report(&s)
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        assert_eq!(top, ["Ready", "Version", "VersionCheck", "Router", "Proxy"]);
        // No proxy → no Proxy key.
        assert!(report(&alone()).get("Proxy").is_none());
        // Once the sleeve runs: its interface and libpcap's counters.
        let mut s = alone();
        s.router.interface = "vethwe-pcap (via pcap)".into();
        s.router.capture_stats = Some(CaptureStats {
            packets_received: 10,
            packets_dropped: 2,
            packets_if_dropped: 1,
            ..CaptureStats::default()
        });
        let router = &report(&s)["Router"];
        assert_eq!(router["Interface"], "vethwe-pcap (via pcap)");
        assert_eq!(
            router["CaptureStats"],
            json!({"PacketsReceived": 10, "PacketsDropped": 2, "PacketsIfDropped": 1})
        );
        assert!(router.get("Sleeve").is_none());
        s.router.sleeve = Some(SleeveCounters {
            macs_evicted: 3,
            icmp_rate_limited: 4,
        });
        assert_eq!(
            report(&s)["Router"]["Sleeve"],
            json!({"macs_evicted": 3, "icmp_rate_limited": 4})
        );
    }

    #[test]
    fn connection_attributes_are_space_separated() {
        let mut s = alone();
        s.router.connections = vec![ConnectionStatus {
            address: "192.168.48.11:6783".into(),
            outbound: true,
            state: ConnectionState::Established,
            info: "encrypted   sleeve 7e:21:4a:70:2f:45(host1)".into(),
            attrs: Some(BTreeMap::from([
                ("encrypted".to_string(), json!(true)),
                ("mtu".to_string(), json!(1376)),
                ("name".to_string(), json!("sleeve")),
            ])),
        }];
        assert_eq!(
            render_connections(&s),
            "-> 192.168.48.11:6783    established encrypted   sleeve 7e:21:4a:70:2f:45(host1) encrypted=true mtu=1376\n"
        );
    }
}
