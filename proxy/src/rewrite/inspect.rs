//! Inspect replies with `--rewrite-inspect` (spec §4.2–4.3): show the weave address in
//! `NetworkSettings`.

use std::net::Ipv4Addr;

use serde_json::{Map, Value};

/// Sets `NetworkSettings.MacAddress`, `.IPAddress` and `.IPPrefixLen` of a container inspect
/// reply to the container's first weave interface and address. Without an address, or when the
/// reply is not an object, it is returned unchanged.
pub fn rewrite_inspect(mut body: Value, mac: &str, first_addr: Option<(Ipv4Addr, u8)>) -> Value {
    let Some((ip, prefix_len)) = first_addr else {
        return body;
    };
    let Some(container) = body.as_object_mut() else {
        return body;
    };
    let settings = container
        .entry("NetworkSettings")
        .or_insert_with(|| Value::Object(Map::new()));
    if !settings.is_object() {
        *settings = Value::Object(Map::new());
    }
    if let Some(settings) = settings.as_object_mut() {
        settings.insert("MacAddress".to_string(), Value::from(mac));
        settings.insert("IPAddress".to_string(), Value::from(ip.to_string()));
        settings.insert("IPPrefixLen".to_string(), Value::from(prefix_len));
    }
    body
}

/// The container object embedded in an exec inspect reply (Docker < 1.10 only; modern replies
/// carry just `ContainerID`).
pub fn exec_inspect_container(body: &Value) -> Option<&Value> {
    body.get("Container").filter(|c| c.is_object())
}

/// [`rewrite_inspect`] applied to the embedded container of an exec inspect reply, if any.
pub fn rewrite_exec_inspect(
    mut body: Value,
    mac: &str,
    first_addr: Option<(Ipv4Addr, u8)>,
) -> Value {
    if let Some(container) = body.get_mut("Container").filter(|c| c.is_object()) {
        *container = rewrite_inspect(container.take(), mac, first_addr);
    }
    body
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic on bad fixtures
mod tests {
    use super::*;
    use serde_json::json;

    const ADDR: Option<(Ipv4Addr, u8)> = Some((Ipv4Addr::new(10, 32, 0, 5), 12));

    #[test]
    fn sets_only_three_fields() {
        let body: Value = serde_json::from_str(
            r#"{"Id":"abc","State":{"Pid":42},"NetworkSettings":{"Bridge":"","IPAddress":"172.17.0.2","IPPrefixLen":16,"MacAddress":"02:42:ac:11:00:02","Networks":{"bridge":{"IPAddress":"172.17.0.2"}}},"Size":18446744073709551615}"#,
        )
        .unwrap();
        let out = rewrite_inspect(body, "ce:7a:1f:00:00:01", ADDR);
        assert_eq!(
            out.to_string(),
            r#"{"Id":"abc","State":{"Pid":42},"NetworkSettings":{"Bridge":"","IPAddress":"10.32.0.5","IPPrefixLen":12,"MacAddress":"ce:7a:1f:00:00:01","Networks":{"bridge":{"IPAddress":"172.17.0.2"}}},"Size":18446744073709551615}"#
        );
    }

    #[test]
    fn no_address_no_change() {
        let body = json!({"NetworkSettings": {"IPAddress": ""}});
        assert_eq!(rewrite_inspect(body.clone(), "m", None), body);
        assert_eq!(rewrite_inspect(json!("x"), "m", ADDR), json!("x"));
    }

    #[test]
    fn creates_missing_settings() {
        let out = rewrite_inspect(json!({"NetworkSettings": null}), "m", ADDR);
        assert_eq!(
            out["NetworkSettings"],
            json!({"MacAddress": "m", "IPAddress": "10.32.0.5", "IPPrefixLen": 12})
        );
    }

    #[test]
    fn exec_inspect_old_and_new() {
        let old = json!({"ID": "e1", "Container": {"Id": "c1", "NetworkSettings": {}}});
        assert!(exec_inspect_container(&old).is_some());
        let out = rewrite_exec_inspect(old, "m", ADDR);
        assert_eq!(
            out["Container"]["NetworkSettings"]["IPAddress"],
            json!("10.32.0.5")
        );
        let modern = json!({"ID": "e1", "ContainerID": "c1", "Running": false});
        assert!(exec_inspect_container(&modern).is_none());
        assert_eq!(rewrite_exec_inspect(modern.clone(), "m", ADDR), modern);
    }
}
