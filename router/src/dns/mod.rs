//! weaveDNS (spec §2) as pure parts: the names the mesh knows ([`NameTable`], built from the
//! gossiped entries), the configuration, and (added by the DNS work) the entry registry and
//! its gossip codec, the query answering and the upstream (resolv.conf) parsing. The router's
//! shells run the DNS server on UDP/TCP and the registry's actor around them.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// The gossip channel DNS entries ride (Weave's name).
pub const DNS_CHANNEL: &str = "nameserver";
/// `--dns-domain` default.
pub const DEFAULT_DOMAIN: &str = "weave.local.";
/// `--dns-ttl` default, seconds.
pub const DEFAULT_TTL: u32 = 1;
/// `--dns-fallback-timeout` default.
pub const DEFAULT_FALLBACK_TIMEOUT: Duration = Duration::from_secs(5);

/// What the router's DNS parts need (`--no-dns` = none of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// Normalised by [`normalise_domain`]: `weave.local.`.
    pub domain: String,
    /// UDP and TCP listeners (the script passes `<docker bridge IP>:53`).
    pub listen: SocketAddr,
    /// TTL of every locally generated answer.
    pub ttl: u32,
    /// Read timeout for upstream queries.
    pub fallback_timeout: Duration,
    /// Where the upstream servers are listed.
    pub resolv_conf: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("invalid DNS domain {0:?}: it needs at least one label of letters, digits and '-'")]
    Invalid(String),
}

/// `weave.local` and `weave.local.` both give `weave.local.` (spec §2.1); lower-cased, since
/// lookups are case-insensitive.
pub fn normalise_domain(domain: &str) -> Result<String, DomainError> {
    let trimmed = domain.strip_suffix('.').unwrap_or(domain);
    let valid_label = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if trimmed.is_empty() || trimmed.len() > 253 || !trimmed.split('.').all(valid_label) {
        return Err(DomainError::Invalid(domain.to_string()));
    }
    Ok(format!("{}.", trimmed.to_ascii_lowercase()))
}

/// A snapshot of the live names, for answering queries: built from the registry's live entries
/// (tombstones left out) whenever they change, read by the server without locking the registry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameTable {
    /// Lower-cased FQDN with its trailing dot → its addresses, each once, in entry order.
    by_name: HashMap<String, Vec<Ipv4Addr>>,
    /// Address → the hostname (as stored) of the first entry with it.
    by_addr: HashMap<Ipv4Addr, String>,
}

impl NameTable {
    /// From `(hostname, address)` of the live entries, in the registry's stored order (the
    /// first entry of an address names it in reverse lookups, spec §2.3).
    pub fn new<'a>(live: impl IntoIterator<Item = (&'a str, Ipv4Addr)>) -> Self {
        let mut table = Self::default();
        for (hostname, addr) in live {
            let addrs = table.by_name.entry(fqdn_key(hostname)).or_default();
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
            table
                .by_addr
                .entry(addr)
                .or_insert_with(|| hostname.to_string());
        }
        table
    }

    /// The addresses of `fqdn` (any case, with or without the trailing dot); empty if unknown.
    pub fn lookup(&self, fqdn: &str) -> &[Ipv4Addr] {
        self.by_name.get(&fqdn_key(fqdn)).map_or(&[], Vec::as_slice)
    }

    /// The hostname a reverse lookup of `addr` gives.
    pub fn reverse(&self, addr: Ipv4Addr) -> Option<&str> {
        self.by_addr.get(&addr).map(String::as_str)
    }

    /// How many distinct names.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

fn fqdn_key(name: &str) -> String {
    let mut key = name.to_ascii_lowercase();
    if !key.ends_with('.') {
        key.push('.');
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_normalise() {
        assert_eq!(
            normalise_domain("weave.local").as_deref(),
            Ok("weave.local.")
        );
        assert_eq!(
            normalise_domain("Weave.Local.").as_deref(),
            Ok("weave.local.")
        );
        assert_eq!(normalise_domain("local").as_deref(), Ok("local."));
        for bad in ["", ".", "a..b", "a b."] {
            assert!(normalise_domain(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn table_lookups_ignore_case_and_dot_and_keep_the_first_reverse_name() {
        let a = Ipv4Addr::new(10, 32, 0, 1);
        let b = Ipv4Addr::new(10, 32, 0, 2);
        let table = NameTable::new([
            ("web.weave.local.", a),
            ("Web.weave.local.", b),
            ("web.weave.local.", a),
            ("alias.weave.local.", a),
        ]);
        assert_eq!(table.lookup("WEB.weave.local"), &[a, b]);
        assert_eq!(table.lookup("nope.weave.local."), &[] as &[Ipv4Addr]);
        assert_eq!(table.reverse(a), Some("web.weave.local."));
        assert_eq!(table.reverse(b), Some("Web.weave.local."));
        assert_eq!(table.len(), 2);
    }
}
