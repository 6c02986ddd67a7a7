//! Legacy "HostConfig in start" bodies (spec §3.5): a start-time HostConfig replaces the
//! create-time one, so the weavewait bind and the DNS settings are put back into it.

use serde_json::{Map, Value};

use super::{
    as_object_mut, get_str, set_weave_dns, set_weavewait_bind, RewriteError, WeavewaitVariant,
};
use crate::rewrite::CreateOptions;

/// Rewrites the body of a start of a woven container. `None` means "forward it unchanged": an
/// empty or `null` body, or one without a HostConfig. `inspected_hostname` is the container's
/// `Config.Hostname`, used for the DNS search rule.
pub fn rewrite_start_body(
    body: &[u8],
    opts: &CreateOptions,
    inspected_hostname: &str,
) -> Result<Option<Value>, RewriteError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let mut top: Value = serde_json::from_slice(body)?;
    if top.is_null() {
        return Ok(None);
    }
    let obj = as_object_mut(&mut top)?;
    if obj.is_empty() {
        return Ok(None);
    }
    // Docker prefers a nested HostConfig; without one the whole object is the HostConfig.
    match obj.get_mut("HostConfig") {
        Some(Value::Object(host_config)) => {
            rewrite_host_config(host_config, opts, inspected_hostname)?
        }
        Some(_) => return Ok(None),
        None => rewrite_host_config(obj, opts, inspected_hostname)?,
    }
    Ok(Some(top))
}

fn rewrite_host_config(
    host_config: &mut Map<String, Value>,
    opts: &CreateOptions,
    hostname: &str,
) -> Result<(), RewriteError> {
    let network_mode = get_str(host_config, "NetworkMode")?.unwrap_or("");
    if network_mode == "host" || network_mode.starts_with("container:") {
        // The container will not be attached, so its entrypoint must not wait.
        return set_weavewait_bind(host_config, &opts.weavewait_dir, WeavewaitVariant::Noop);
    }
    set_weavewait_bind(
        host_config,
        &opts.weavewait_dir,
        WeavewaitVariant::waiting(opts.no_multicast_route),
    )?;
    if let (false, Some(server)) = (opts.without_dns, opts.dns_server) {
        set_weave_dns(host_config, hostname, server, &opts.dns_domain)?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic on bad fixtures
mod tests {
    use super::*;
    use crate::rewrite::hostname::HostnameRule;
    use serde_json::json;
    use std::net::Ipv4Addr;
    use std::path::PathBuf;

    fn opts() -> CreateOptions {
        CreateOptions {
            weavewait_dir: PathBuf::from("/ww"),
            no_multicast_route: false,
            without_dns: false,
            dns_domain: "weave.local.".to_string(),
            dns_server: Some(Ipv4Addr::new(172, 17, 0, 1)),
            hostname: HostnameRule::default(),
            no_default_ipalloc: false,
        }
    }

    fn start(body: &str) -> Option<Value> {
        rewrite_start_body(body.as_bytes(), &opts(), "c1").unwrap()
    }

    #[test]
    fn nothing_to_rewrite() {
        for body in [
            "",
            "  \n",
            "null",
            "{}",
            r#"{"HostConfig": null}"#,
            r#"{"HostConfig": 5}"#,
        ] {
            assert_eq!(start(body), None, "{body:?}");
        }
    }

    #[test]
    fn bare_host_config() {
        // What docker 1.x clients sent (test 666): the whole body is the HostConfig.
        let out =
            start(r#"{"Binds":["/tmp:/data"],"MemorySwap":-1,"NetworkMode":"default","Dns":null}"#)
                .unwrap();
        assert_eq!(
            out.to_string(),
            r#"{"Binds":["/tmp:/data","/ww/w:/w:ro"],"MemorySwap":-1,"NetworkMode":"default","Dns":["172.17.0.1"],"DnsSearch":["."]}"#
        );
    }

    #[test]
    fn nested_host_config_keeps_siblings() {
        let out =
            start(r#"{"Other":{"x":1},"HostConfig":{"Binds":["/a:/w"]},"MemorySwap":-1}"#).unwrap();
        assert_eq!(
            out.to_string(),
            r#"{"Other":{"x":1},"HostConfig":{"Binds":["/ww/w:/w:ro"],"Dns":["172.17.0.1"],"DnsSearch":["."]},"MemorySwap":-1}"#
        );
    }

    #[test]
    fn host_and_container_networking_get_noop() {
        for mode in ["host", "container:abc"] {
            let body = format!(r#"{{"NetworkMode":"{mode}"}}"#);
            let out = start(&body).unwrap();
            assert_eq!(out["Binds"], json!(["/ww/w-noop:/w:ro"]));
            assert!(out.get("Dns").is_none());
        }
    }

    #[test]
    fn nomcast_and_without_dns() {
        let o = CreateOptions {
            no_multicast_route: true,
            without_dns: true,
            ..opts()
        };
        let out = rewrite_start_body(br#"{"NetworkMode":"bridge"}"#, &o, "c1")
            .unwrap()
            .unwrap();
        assert_eq!(out["Binds"], json!(["/ww/w-nomcast:/w:ro"]));
        assert!(out.get("Dns").is_none());
        // An empty hostname searches the weave domain.
        let out = rewrite_start_body(br#"{"Privileged":false}"#, &opts(), "")
            .unwrap()
            .unwrap();
        assert_eq!(out["DnsSearch"], json!(["weave.local."]));
    }

    #[test]
    fn errors() {
        for body in ["[]", "{", r#"{"Binds": 3}"#, r#"{"NetworkMode": 1}"#] {
            let err = rewrite_start_body(body.as_bytes(), &opts(), "c1").unwrap_err();
            assert_eq!(err.status(), 500, "{body}");
        }
    }
}
