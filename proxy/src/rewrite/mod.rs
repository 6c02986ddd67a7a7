//! Request and response rewrites (pure): create (§2), legacy start bodies (§3.5), exec create
//! (§4.1) and inspect replies (§4.2–4.3). Everything works on `serde_json::Value`, so fields we
//! do not model, key order and exact numbers survive.

mod create;
mod exec;
pub mod hostname;
mod inspect;
mod start;

pub use create::{plan_create, rewrite_create, CreateOptions, CreatePlan, ImageConfig};
pub use exec::{container_is_woven, has_weavewait_entrypoint, rewrite_exec};
pub use inspect::{exec_inspect_container, rewrite_exec_inspect, rewrite_inspect};
pub use start::rewrite_start_body;

use std::path::Path;

use serde_json::{Map, Value};

use crate::cidr::{weave_cidr_from_env, CidrError};

/// The entrypoint that makes a container wait for its weave interface.
pub const WEAVEWAIT_ENTRYPOINT: &str = "/w/w";

#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error(transparent)]
    InvalidWeaveCidr(#[from] CidrError),
    #[error("No such image: {0}")]
    NoSuchImage(String),
    #[error("No command specified")]
    NoCommandSpecified,
    /// A field of the wrong JSON type; `got` is Go's name for it, as Weave reported it.
    #[error("Wrong type for {field} field, expected {expected}, but got {got}")]
    WrongType {
        field: String,
        expected: &'static str,
        got: &'static str,
    },
    #[error(transparent)]
    InvalidJson(#[from] serde_json::Error),
    #[error("json: cannot unmarshal {got} into a JSON object")]
    NotAnObject { got: &'static str },
    /// The caller did not pass the image config that `plan_create` asked for.
    #[error("image {0:?} was not inspected before rewriting the create request")]
    ImageNotInspected(String),
}

impl RewriteError {
    /// The HTTP status the proxy answers with.
    pub fn status(&self) -> u16 {
        match self {
            RewriteError::InvalidWeaveCidr(_) => 400,
            RewriteError::NoSuchImage(_) => 404,
            _ => 500,
        }
    }

    pub(crate) fn wrong_type(field: &str, expected: &'static str, got: &Value) -> Self {
        RewriteError::WrongType {
            field: field.to_string(),
            expected,
            got: go_type_name(got),
        }
    }
}

/// Which weavewait variant a container's `/w` bind points at (spec §3.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeavewaitVariant {
    /// Waits for ethwe and the multicast route.
    Normal,
    /// Waits for ethwe only (`--no-multicast-route`).
    NoMulticast,
    /// Does not wait (legacy start with host or container networking).
    Noop,
}

impl WeavewaitVariant {
    /// The subdirectory of the weavewait dir that holds this variant's `w`.
    pub fn dir_name(self) -> &'static str {
        match self {
            WeavewaitVariant::Normal => "w",
            WeavewaitVariant::NoMulticast => "w-nomcast",
            WeavewaitVariant::Noop => "w-noop",
        }
    }

    pub(crate) fn waiting(no_multicast_route: bool) -> Self {
        if no_multicast_route {
            WeavewaitVariant::NoMulticast
        } else {
            WeavewaitVariant::Normal
        }
    }
}

/// The bind that mounts a weavewait variant read-only at `/w`.
pub fn weavewait_bind(weavewait_dir: &Path, variant: WeavewaitVariant) -> String {
    format!("{}:/w:ro", weavewait_dir.join(variant.dir_name()).display())
}

/// Spec §2.1: whether the proxy weaves a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision<'a> {
    /// Leave it alone, for this reason (for the log).
    LeaveAlone(&'static str),
    /// Weave it, with this `WEAVE_CIDR` value (`None` when the variable is absent).
    Weave { weave_cidr: Option<&'a str> },
}

/// Spec §2.1 on a container's NetworkMode and the value of its first `WEAVE_CIDR=` entry.
pub fn decide<'a>(
    network_mode: Option<&str>,
    weave_cidr: Option<&'a str>,
    no_default_ipalloc: bool,
) -> Decision<'a> {
    match network_mode.unwrap_or("") {
        "" | "default" | "bridge" | "none" => {}
        "host" => return Decision::LeaveAlone("the container has '--net=host'"),
        mode if mode.starts_with("container:") => {
            return Decision::LeaveAlone("the container shares another container's network")
        }
        _ => {
            return Decision::LeaveAlone(
                "the container is on a user-defined or plugin network, not the default bridge",
            )
        }
    }
    match weave_cidr {
        // Same test as `parse_weave_cidr`, so the two never disagree about `none`.
        Some(value) if value.trim() == "none" => {
            Decision::LeaveAlone("the container was created with '-e WEAVE_CIDR=none'")
        }
        None if no_default_ipalloc => Decision::LeaveAlone(
            "the container has no WEAVE_CIDR and the proxy runs with '--no-default-ipalloc'",
        ),
        weave_cidr => Decision::Weave { weave_cidr },
    }
}

/// Parses a request body that must be a JSON object.
pub fn parse_object(body: &[u8]) -> Result<Value, RewriteError> {
    let value: Value = serde_json::from_slice(body)?;
    if !value.is_object() {
        return Err(RewriteError::NotAnObject {
            got: go_type_name(&value),
        });
    }
    Ok(value)
}

/// Go's `%T` of a decoded JSON value, which Weave put in its type errors.
fn go_type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "<nil>",
        Value::Bool(_) => "bool",
        Value::Number(_) => "float64",
        Value::String(_) => "string",
        Value::Array(_) => "[]interface {}",
        Value::Object(_) => "map[string]interface {}",
    }
}

pub(crate) fn as_object(value: &Value) -> Result<&Map<String, Value>, RewriteError> {
    value.as_object().ok_or(RewriteError::NotAnObject {
        got: go_type_name(value),
    })
}

pub(crate) fn as_object_mut(value: &mut Value) -> Result<&mut Map<String, Value>, RewriteError> {
    let got = go_type_name(value);
    value
        .as_object_mut()
        .ok_or(RewriteError::NotAnObject { got })
}

/// An object field; missing and null both mean absent.
pub(crate) fn get_object<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
) -> Result<Option<&'a Map<String, Value>>, RewriteError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(map)) => Ok(Some(map)),
        Some(other) => Err(RewriteError::wrong_type(key, "object", other)),
    }
}

/// A string field; missing and null both mean absent.
pub(crate) fn get_str<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
) -> Result<Option<&'a str>, RewriteError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(RewriteError::wrong_type(key, "string", other)),
    }
}

/// A string-list field, where a lone string counts as a one-element list (Docker's strslice);
/// missing and null both mean absent.
pub(crate) fn get_str_list(
    obj: &Map<String, Value>,
    key: &str,
) -> Result<Option<Vec<String>>, RewriteError> {
    const EXPECTED: &str = "string or array of strings";
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(vec![s.clone()])),
        Some(value @ Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| RewriteError::wrong_type(key, EXPECTED, value))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(other) => Err(RewriteError::wrong_type(key, EXPECTED, other)),
    }
}

/// `HostConfig`, created empty when missing or null.
pub(crate) fn host_config_mut(
    obj: &mut Map<String, Value>,
) -> Result<&mut Map<String, Value>, RewriteError> {
    let slot = obj
        .entry("HostConfig")
        .or_insert_with(|| Value::Object(Map::new()));
    if slot.is_null() {
        *slot = Value::Object(Map::new());
    }
    let got = go_type_name(slot);
    slot.as_object_mut().ok_or(RewriteError::WrongType {
        field: "HostConfig".to_string(),
        expected: "object",
        got,
    })
}

/// The first `WEAVE_CIDR=` value of the object's `Env` (type-checked like Weave does).
pub(crate) fn env_weave_cidr(obj: &Map<String, Value>) -> Result<Option<&str>, RewriteError> {
    const EXPECTED: &str = "string or array of strings";
    match obj.get("Env") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(s.strip_prefix("WEAVE_CIDR=")),
        Some(value @ Value::Array(items)) => {
            if items.iter().any(|item| !item.is_string()) {
                return Err(RewriteError::wrong_type("Env", EXPECTED, value));
            }
            Ok(weave_cidr_from_env(items))
        }
        Some(other) => Err(RewriteError::wrong_type("Env", EXPECTED, other)),
    }
}

/// Spec §2.3 step 1: replace any bind at `/w` by the weavewait one.
pub(crate) fn set_weavewait_bind(
    host_config: &mut Map<String, Value>,
    weavewait_dir: &Path,
    variant: WeavewaitVariant,
) -> Result<(), RewriteError> {
    let mut binds: Vec<String> = get_str_list(host_config, "Binds")?
        .unwrap_or_default()
        .into_iter()
        .filter(|bind| bind.split(':').nth(1) != Some("/w"))
        .collect();
    binds.push(weavewait_bind(weavewait_dir, variant));
    host_config.insert("Binds".to_string(), Value::from(binds));
    Ok(())
}

/// Spec §2.3 step 4: weaveDNS as the last resolver, and a search domain unless one is set.
/// `name` is the derived container name ("" if none).
pub(crate) fn set_weave_dns(
    host_config: &mut Map<String, Value>,
    name: &str,
    dns_server: std::net::Ipv4Addr,
    dns_domain: &str,
) -> Result<(), RewriteError> {
    let mut dns = get_str_list(host_config, "Dns")?.unwrap_or_default();
    let server = dns_server.to_string();
    // Idempotent: a body that already names weaveDNS keeps a single entry.
    if !dns.contains(&server) {
        dns.push(server);
    }
    host_config.insert("Dns".to_string(), Value::from(dns));
    let search = get_str_list(host_config, "DnsSearch")?.unwrap_or_default();
    if search.is_empty() {
        // "." makes Docker write no search line; glibc then uses the hostname's domain.
        let domain = if name.is_empty() {
            with_trailing_dot(dns_domain)
        } else {
            ".".to_string()
        };
        host_config.insert("DnsSearch".to_string(), Value::from(vec![domain]));
    }
    Ok(())
}

fn with_trailing_dot(domain: &str) -> String {
    if domain.ends_with('.') {
        domain.to_string()
    } else {
        format!("{domain}.")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic on bad fixtures
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn decision_table() {
        let weave = |c| Decision::Weave { weave_cidr: c };
        assert_eq!(decide(None, None, false), weave(None));
        for mode in ["", "default", "bridge", "none"] {
            assert_eq!(
                decide(Some(mode), Some("10.1.1.1/24"), false),
                weave(Some("10.1.1.1/24"))
            );
        }
        for mode in ["host", "container:abc", "mynet", "proj_default", "weave"] {
            assert!(
                matches!(decide(Some(mode), None, false), Decision::LeaveAlone(_)),
                "{mode}"
            );
        }
        assert!(matches!(
            decide(None, Some("none"), false),
            Decision::LeaveAlone(_)
        ));
        assert!(matches!(decide(None, None, true), Decision::LeaveAlone(_)));
        assert_eq!(decide(None, Some(""), true), weave(Some("")));
        assert_eq!(
            decide(None, Some("none 1.2.3.4/8"), false),
            weave(Some("none 1.2.3.4/8"))
        );
    }

    #[test]
    fn status_codes() {
        assert_eq!(RewriteError::NoSuchImage("x".into()).status(), 404);
        assert_eq!(
            RewriteError::NoSuchImage("x".into()).to_string(),
            "No such image: x"
        );
        assert_eq!(RewriteError::NoCommandSpecified.status(), 500);
    }

    #[test]
    fn type_errors_read_like_weave() {
        let obj = json!({"Cmd": 5, "Env": ["A", 1], "HostConfig": "x"});
        let obj = obj.as_object().unwrap();
        assert_eq!(
            get_str_list(obj, "Cmd").unwrap_err().to_string(),
            "Wrong type for Cmd field, expected string or array of strings, but got float64"
        );
        assert!(env_weave_cidr(obj).is_err());
        assert_eq!(
            get_object(obj, "HostConfig").unwrap_err().to_string(),
            "Wrong type for HostConfig field, expected object, but got string"
        );
    }

    #[test]
    fn parse_object_rejects_non_objects() {
        assert!(parse_object(b"").is_err());
        assert!(parse_object(b"[]").is_err());
        assert!(parse_object(b"{").is_err());
        assert!(parse_object(b"{}").is_ok());
    }
}
