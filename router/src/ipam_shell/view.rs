//! `weave status` IPAM section and `weave status ipam` (pure), rendered from the allocator's
//! status JSON (spec ipam-dns-cli §1.11: the `IPAM` object of `weave report`).

use std::fmt::Write as _;

use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct PaxosView {
    pub elector: bool,
    pub known_nodes: usize,
    pub quorum: usize,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct EntryView {
    pub token: String,
    pub size: u64,
    pub peer: String,
    pub nickname: String,
    pub is_known_peer: bool,
    pub version: u64,
}

/// The parts of the report's `IPAM` object the text views need.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct IpamView {
    /// The allocator's own `Status:` line, when it says.
    pub status: String,
    pub paxos: Option<PaxosView>,
    pub range: String,
    #[serde(rename = "RangeNumIPs")]
    pub range_num_ips: u64,
    #[serde(rename = "ActiveIPs")]
    pub active_ips: u64,
    pub default_subnet: String,
    pub entries: Vec<EntryView>,
    pub pending_allocates: Vec<Value>,
}

impl IpamView {
    pub fn from_report(report: &Value) -> Self {
        serde_json::from_value(report.clone()).unwrap_or_default()
    }

    /// Weave's `allIPAMOwnersUnreachable`: no entry with addresses belongs to a known peer.
    fn all_owners_unreachable(&self) -> bool {
        !self.entries.iter().any(|e| e.size > 0 && e.is_known_peer)
    }

    /// The `Status:` line.
    pub fn status_line(&self) -> String {
        if !self.status.is_empty() {
            return self.status.clone();
        }
        if let Some(p) = &self.paxos {
            return if p.elector {
                format!(
                    "awaiting consensus (quorum: {}, known: {})",
                    p.quorum, p.known_nodes
                )
            } else {
                "priming".to_string()
            };
        }
        if self.entries.is_empty() {
            "idle".to_string()
        } else if !self.pending_allocates.is_empty() {
            if self.all_owners_unreachable() {
                "all IP ranges owned by unreachable peers - use 'rmpeer' if they are dead"
                    .to_string()
            } else {
                "waiting for IP(s) to become available".to_string()
            }
        } else {
            "ready".to_string()
        }
    }
}

fn field(out: &mut String, name: &str, value: &str) {
    let _ = writeln!(out, "{name:>15}: {value}");
}

/// The `Service: ipam` block of `weave status` (no leading blank line).
pub fn render_section(report: &Value) -> String {
    let view = IpamView::from_report(report);
    let mut out = String::new();
    field(&mut out, "Service", "ipam");
    field(&mut out, "Status", &view.status_line());
    field(&mut out, "Range", &view.range);
    field(&mut out, "DefaultSubnet", &view.default_subnet);
    out
}

/// `weave status ipam`: one line per owning peer, `me` first, the others in the order the ring
/// lists them; empty while there is no ring.
pub fn render_peers(report: &Value, me: &str) -> String {
    let view = IpamView::from_report(report);
    // (name, nickname, known, size), in first-seen order.
    let mut owners: Vec<(String, String, bool, u64)> = Vec::new();
    for e in &view.entries {
        match owners.iter_mut().find(|o| o.0 == e.peer) {
            Some(o) => o.3 += e.size,
            None => owners.push((e.peer.clone(), e.nickname.clone(), e.is_known_peer, e.size)),
        }
    }
    if let Some(i) = owners.iter().position(|o| o.0 == me) {
        let mine = owners.remove(i);
        owners.insert(0, mine);
    }
    let total = view.range_num_ips.max(1) as f64;
    let mut out = String::new();
    for (name, nick, known, size) in owners {
        let who = format!("{name}({nick})");
        let pct = size as f64 * 100.0 / total;
        let info = if name == me {
            format!("({} active)", view.active_ips)
        } else if !known {
            "- unreachable!".to_string()
        } else {
            String::new()
        };
        let line = format!("{who:<37} {size:>8} IPs ({pct:04.1}% of total) {info}");
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn entry(token: &str, size: u64, peer: &str, nick: &str, known: bool) -> Value {
        json!({"Token": token, "Size": size, "Peer": peer, "Nickname": nick,
               "IsKnownPeer": known, "Version": 1})
    }

    #[test]
    fn status_lines() {
        let base = json!({"Paxos": null, "Range": "10.32.0.0/12", "RangeNumIPs": 1048576,
            "ActiveIPs": 0, "DefaultSubnet": "10.32.0.0/12", "Entries": [],
            "PendingClaims": [], "PendingAllocates": []});
        assert_eq!(
            render_section(&base),
            "        Service: ipam\n         Status: idle\n          Range: 10.32.0.0/12\n  DefaultSubnet: 10.32.0.0/12\n"
        );
        let mut v = base.clone();
        v["Paxos"] = json!({"Elector": true, "KnownNodes": 1, "Quorum": 2});
        assert_eq!(
            IpamView::from_report(&v).status_line(),
            "awaiting consensus (quorum: 2, known: 1)"
        );
        v["Paxos"] = json!({"Elector": false, "KnownNodes": 0, "Quorum": 0});
        assert_eq!(IpamView::from_report(&v).status_line(), "priming");
        v["Status"] = json!("ready");
        assert_eq!(
            IpamView::from_report(&v).status_line(),
            "ready",
            "the core's word wins"
        );
        let mut v = base.clone();
        v["Entries"] = json!([entry("10.32.0.0", 524288, "aa:00:00:00:00:01", "one", true)]);
        assert_eq!(IpamView::from_report(&v).status_line(), "ready");
        v["PendingAllocates"] = json!(["abc 10.32.0.0/12"]);
        assert_eq!(
            IpamView::from_report(&v).status_line(),
            "waiting for IP(s) to become available"
        );
        v["Entries"] = json!([entry(
            "10.32.0.0",
            524288,
            "aa:00:00:00:00:02",
            "two",
            false
        )]);
        assert_eq!(
            IpamView::from_report(&v).status_line(),
            "all IP ranges owned by unreachable peers - use 'rmpeer' if they are dead"
        );
    }

    #[test]
    fn peers_view() {
        let v = json!({"Range": "10.32.0.0/12", "RangeNumIPs": 1048576, "ActiveIPs": 3,
        "Entries": [
            entry("10.32.0.0", 524288, "aa:00:00:00:00:01", "one", true),
            entry("10.40.0.0", 262144, "aa:00:00:00:00:02", "two", false),
            entry("10.44.0.0", 131072, "aa:00:00:00:00:03", "three", true),
            entry("10.46.0.0", 131072, "aa:00:00:00:00:03", "three", true),
        ]});
        let text = render_peers(&v, "aa:00:00:00:00:03");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "aa:00:00:00:00:03(three)                262144 IPs (25.0% of total) (3 active)",
                "aa:00:00:00:00:01(one)                  524288 IPs (50.0% of total)",
                "aa:00:00:00:00:02(two)                  262144 IPs (25.0% of total) - unreachable!",
            ]
        );
        assert_eq!(render_peers(&json!({"Entries": []}), "x"), "");
        // Small shares keep the leading zero (Go's %04.1f).
        let v = json!({"RangeNumIPs": 1000, "ActiveIPs": 0,
            "Entries": [entry("10.0.0.0", 50, "me", "m", true)]});
        assert_eq!(
            render_peers(&v, "me"),
            "me(m)                                       50 IPs (05.0% of total) (0 active)\n"
        );
    }
}
