//! `POST /containers/{id}/exec` (spec §4.1): execs into woven containers wait for the network too.

use serde_json::Value;

use super::{as_object_mut, decide, get_str_list, Decision, RewriteError, WEAVEWAIT_ENTRYPOINT};
use crate::cidr::weave_cidr_from_env;

/// Puts `/w/w` in front of the exec's `Cmd`.
pub fn rewrite_exec(mut body: Value) -> Result<Value, RewriteError> {
    let obj = as_object_mut(&mut body)?;
    let cmd = get_str_list(obj, "Cmd")?.unwrap_or_default();
    if cmd.first().map(String::as_str) != Some(WEAVEWAIT_ENTRYPOINT) {
        let mut woven = Vec::with_capacity(cmd.len() + 1);
        woven.push(WEAVEWAIT_ENTRYPOINT.to_string());
        woven.extend(cmd);
        obj.insert("Cmd".to_string(), Value::from(woven));
    }
    Ok(body)
}

/// Whether an inspected container's entrypoint is weavewait (`Config.Entrypoint[0] == "/w/w"`):
/// the proxy wove it at create.
pub fn has_weavewait_entrypoint(inspect: &Value) -> bool {
    match inspect.pointer("/Config/Entrypoint") {
        Some(Value::Array(items)) => {
            items.first().and_then(Value::as_str) == Some(WEAVEWAIT_ENTRYPOINT)
        }
        Some(Value::String(s)) => s == WEAVEWAIT_ENTRYPOINT,
        _ => false,
    }
}

/// Whether execs into this inspected container get weavewait: it has weavewait mounted at `/w`,
/// runs it as entrypoint, and §2.1 on its NetworkMode and Env says weave (an invalid
/// `WEAVE_CIDR` still counts as weave: the container was woven anyway).
pub fn container_is_woven(inspect: &Value) -> bool {
    let mounted = inspect
        .get("Mounts")
        .and_then(Value::as_array)
        .is_some_and(|mounts| {
            mounts
                .iter()
                .any(|m| m.get("Destination").and_then(Value::as_str) == Some("/w"))
        })
        // API < 1.20 reported volumes as a map.
        || inspect
            .get("Volumes")
            .and_then(Value::as_object)
            .is_some_and(|volumes| volumes.contains_key("/w"));
    if !mounted || !has_weavewait_entrypoint(inspect) {
        return false;
    }
    let network_mode = inspect
        .pointer("/HostConfig/NetworkMode")
        .and_then(Value::as_str);
    let weave_cidr = inspect
        .pointer("/Config/Env")
        .and_then(Value::as_array)
        .and_then(|env| weave_cidr_from_env(env));
    matches!(
        decide(network_mode, weave_cidr, false),
        Decision::Weave { .. }
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic on bad fixtures
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn prepends_weavewait() {
        let body = json!({"AttachStdout": true, "Cmd": ["ls", "-l"], "Tty": false});
        let out = rewrite_exec(body).unwrap();
        assert_eq!(
            out.to_string(),
            r#"{"AttachStdout":true,"Cmd":["/w/w","ls","-l"],"Tty":false}"#
        );
        assert_eq!(
            rewrite_exec(json!({"Cmd": "ls"})).unwrap()["Cmd"],
            json!(["/w/w", "ls"])
        );
        assert_eq!(rewrite_exec(json!({})).unwrap()["Cmd"], json!(["/w/w"]));
        let already = json!({"Cmd": ["/w/w", "ls"]});
        assert_eq!(rewrite_exec(already).unwrap()["Cmd"], json!(["/w/w", "ls"]));
        assert_eq!(rewrite_exec(json!({"Cmd": 1})).unwrap_err().status(), 500);
        assert!(rewrite_exec(json!([])).is_err());
    }

    fn inspected(mode: &str, env: Value) -> Value {
        json!({
            "Id": "abc",
            "Config": {"Entrypoint": ["/w/w", "sh"], "Env": env},
            "HostConfig": {"NetworkMode": mode},
            "Mounts": [
                {"Type": "bind", "Source": "/data", "Destination": "/data"},
                {"Type": "bind", "Source": "/var/lib/weave/weavewait/w", "Destination": "/w", "RW": false}
            ]
        })
    }

    #[test]
    fn woven_containers() {
        assert!(container_is_woven(&inspected(
            "default",
            json!(["WEAVE_CIDR=10.1.1.1/24"])
        )));
        assert!(container_is_woven(&inspected(
            "bridge",
            json!(["PATH=/bin"])
        )));
        assert!(container_is_woven(&inspected("none", json!(null))));
        // Invalid values were woven all the same.
        assert!(container_is_woven(&inspected(
            "default",
            json!(["WEAVE_CIDR=bogus"])
        )));
        let legacy = json!({
            "Config": {"Entrypoint": ["/w/w"], "Env": []},
            "HostConfig": {"NetworkMode": ""},
            "Volumes": {"/w": "/var/lib/weave/weavewait/w"}
        });
        assert!(container_is_woven(&legacy));
    }

    #[test]
    fn plain_containers() {
        assert!(!container_is_woven(&inspected("host", json!([]))));
        assert!(!container_is_woven(&inspected("mynet", json!([]))));
        assert!(!container_is_woven(&inspected(
            "default",
            json!(["WEAVE_CIDR=none"])
        )));
        let mut no_mount = inspected("default", json!([]));
        no_mount["Mounts"] = json!([]);
        assert!(!container_is_woven(&no_mount));
        let mut other_entrypoint = inspected("default", json!([]));
        other_entrypoint["Config"]["Entrypoint"] = json!(["sh"]);
        assert!(!container_is_woven(&other_entrypoint));
        assert!(!has_weavewait_entrypoint(&other_entrypoint));
        assert!(!container_is_woven(&json!({})));
        assert!(!container_is_woven(&json!("x")));
    }
}
