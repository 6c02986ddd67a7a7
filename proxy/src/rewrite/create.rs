//! `POST /containers/create` (spec §2): decide, then rewrite the body of a container to weave.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde_json::{Map, Value};

use super::{
    as_object, as_object_mut, decide, env_weave_cidr, get_object, get_str, get_str_list,
    host_config_mut, set_weave_dns, set_weavewait_bind, Decision, RewriteError, WeavewaitVariant,
    WEAVEWAIT_ENTRYPOINT,
};
use crate::cidr::parse_weave_cidr;
use crate::rewrite::hostname::HostnameRule;

/// Docker's limit for `Hostname` + `.` + `Domainname`.
const MAX_DOCKER_HOSTNAME: usize = 64;

/// The proxy settings the create and start rewrites depend on.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Host dir holding `w/`, `w-nomcast/` and `w-noop/`, each with the weavewait binary `w`.
    pub weavewait_dir: PathBuf,
    pub no_multicast_route: bool,
    pub without_dns: bool,
    /// With the trailing dot, e.g. `weave.local.`.
    pub dns_domain: String,
    /// `None` while weaveDNS is not running: Dns/DnsSearch are then left alone.
    pub dns_server: Option<Ipv4Addr>,
    pub hostname: HostnameRule,
    pub no_default_ipalloc: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreatePlan {
    /// Forward the original body unchanged; the reason is for the log.
    LeaveAlone(&'static str),
    /// Rewrite with [`rewrite_create`], after inspecting this image when given.
    Weave { image_to_inspect: Option<String> },
}

/// The parts of an image's config that the entrypoint rewrite merges (absent = not set).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
}

/// Spec §2.1, plus validation of `WEAVE_CIDR` now rather than at attach time, so a bad value
/// fails the create with a 400 instead of killing the container at start.
pub fn plan_create(body: &Value, opts: &CreateOptions) -> Result<CreatePlan, RewriteError> {
    let obj = as_object(body)?;
    let network_mode = match get_object(obj, "HostConfig")? {
        Some(host_config) => get_str(host_config, "NetworkMode")?,
        None => None,
    };
    let weave_cidr = match decide(network_mode, env_weave_cidr(obj)?, opts.no_default_ipalloc) {
        Decision::LeaveAlone(reason) => return Ok(CreatePlan::LeaveAlone(reason)),
        Decision::Weave { weave_cidr } => weave_cidr,
    };
    check_addresses(weave_cidr)?;
    let entrypoint = get_str_list(obj, "Entrypoint")?;
    let image_to_inspect = if entrypoint.as_ref().is_none_or(Vec::is_empty) {
        get_str(obj, "Image")?
            .filter(|image| !image.is_empty())
            .map(str::to_string)
    } else {
        None
    };
    Ok(CreatePlan::Weave { image_to_inspect })
}

/// `WEAVE_CIDR` must parse; `net:` forms and no value at all are IPAM's, resolved by the
/// router at attach time.
fn check_addresses(weave_cidr: Option<&str>) -> Result<(), RewriteError> {
    parse_weave_cidr(weave_cidr)?;
    Ok(())
}

/// Spec §2.3 steps 1–4 on a body that `plan_create` said to weave. `name` is the create call's
/// `name` query parameter; `image` the inspected image when the plan asked for one.
pub fn rewrite_create(
    mut body: Value,
    name: Option<&str>,
    image: Option<&ImageConfig>,
    opts: &CreateOptions,
) -> Result<Value, RewriteError> {
    let obj = as_object_mut(&mut body)?;
    set_weavewait_bind(
        host_config_mut(obj)?,
        &opts.weavewait_dir,
        WeavewaitVariant::waiting(opts.no_multicast_route),
    )?;
    set_entrypoint(obj, image)?;
    if !opts.without_dns {
        let name = opts.hostname.derive(name, obj.get("Labels"))?;
        set_hostname(obj, &name, &opts.dns_domain)?;
        if let Some(server) = opts.dns_server {
            set_weave_dns(host_config_mut(obj)?, &name, server, &opts.dns_domain)?;
        }
    }
    Ok(body)
}

/// Step 2: merge the image's Entrypoint/Cmd as Docker would, then put weavewait in front.
fn set_entrypoint(
    obj: &mut Map<String, Value>,
    image: Option<&ImageConfig>,
) -> Result<(), RewriteError> {
    let requested = get_str_list(obj, "Entrypoint")?;
    let mut cmd = get_str_list(obj, "Cmd")?.unwrap_or_default();
    // `--entrypoint=` sends [""]: "no entrypoint, and not the image's either". Go Weave made that
    // ["/w/w", ""], which weavewait cannot run.
    let reset = requested.as_deref() == Some(&[String::new()][..]);
    let mut entrypoint = if reset { Some(Vec::new()) } else { requested };
    if !reset && entrypoint.as_ref().is_none_or(Vec::is_empty) {
        let image_name = get_str(obj, "Image")?.unwrap_or("");
        let image = match image {
            Some(image) => image,
            // No image to look at: Docker itself will reject the create.
            None if image_name.is_empty() => &ImageConfig::default(),
            None => return Err(RewriteError::ImageNotInspected(image_name.to_string())),
        };
        if cmd.is_empty() {
            if let Some(image_cmd) = &image.cmd {
                cmd.clone_from(image_cmd);
                obj.insert("Cmd".to_string(), Value::from(cmd.clone()));
            }
        }
        // Only an absent/null Entrypoint inherits the image's; `[]` means "none".
        if entrypoint.is_none() {
            if let Some(image_entrypoint) = &image.entrypoint {
                entrypoint = Some(image_entrypoint.clone());
                obj.insert(
                    "Entrypoint".to_string(),
                    Value::from(image_entrypoint.clone()),
                );
            }
        }
    }
    let entrypoint = entrypoint.unwrap_or_default();
    if entrypoint.is_empty() && cmd.is_empty() {
        return Err(RewriteError::NoCommandSpecified);
    }
    // Images committed from woven containers already start with /w/w (#979).
    if entrypoint.first().map(String::as_str) != Some(WEAVEWAIT_ENTRYPOINT) {
        let mut woven = Vec::with_capacity(entrypoint.len() + 1);
        woven.push(WEAVEWAIT_ENTRYPOINT.to_string());
        woven.extend(entrypoint);
        obj.insert("Entrypoint".to_string(), Value::from(woven));
    }
    Ok(())
}

/// Step 3: `name.weave.local` as hostname, unless the client chose one or it would be too long.
fn set_hostname(
    obj: &mut Map<String, Value>,
    name: &str,
    dns_domain: &str,
) -> Result<(), RewriteError> {
    let hostname = get_str(obj, "Hostname")?.unwrap_or("");
    if !hostname.is_empty() || name.is_empty() {
        return Ok(());
    }
    // A trailing dot is unusual in a hostname's domain.
    let domain = dns_domain.strip_suffix('.').unwrap_or(dns_domain);
    if name.len() + 1 + domain.len() > MAX_DOCKER_HOSTNAME {
        tracing::warn!(name, "container name too long to be used as hostname");
        return Ok(());
    }
    obj.insert("Hostname".to_string(), Value::from(name));
    obj.insert("Domainname".to_string(), Value::from(domain));
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic on bad fixtures
mod tests {
    use super::*;
    use serde_json::json;

    fn opts() -> CreateOptions {
        CreateOptions {
            weavewait_dir: PathBuf::from("/var/lib/weave/weavewait"),
            no_multicast_route: false,
            without_dns: false,
            dns_domain: "weave.local.".to_string(),
            dns_server: Some(Ipv4Addr::new(172, 17, 0, 1)),
            hostname: HostnameRule::default(),
            no_default_ipalloc: false,
        }
    }

    fn with_cidr(mut body: Value) -> Value {
        body["Env"] = json!(["WEAVE_CIDR=10.35.1.1/24"]);
        body
    }

    fn plan(body: Value) -> Result<CreatePlan, RewriteError> {
        plan_create(&body, &opts())
    }

    fn rewrite(body: Value, image: Option<&ImageConfig>) -> Result<Value, RewriteError> {
        rewrite_create(body, Some("/c1"), image, &opts())
    }

    fn image(entrypoint: Option<&[&str]>, cmd: Option<&[&str]>) -> ImageConfig {
        let own = |l: &[&str]| l.iter().map(|s| s.to_string()).collect();
        ImageConfig {
            entrypoint: entrypoint.map(own),
            cmd: cmd.map(own),
        }
    }

    #[test]
    fn plan_leaves_alone() {
        for mode in ["host", "container:x", "mynet", "proj_default"] {
            let body = with_cidr(json!({"HostConfig": {"NetworkMode": mode}}));
            assert!(
                matches!(plan(body).unwrap(), CreatePlan::LeaveAlone(_)),
                "{mode}"
            );
        }
        let none = json!({"Env": ["WEAVE_CIDR=none", "WEAVE_CIDR=10.1.1.1/24"]});
        assert!(matches!(plan(none).unwrap(), CreatePlan::LeaveAlone(_)));
        let no_alloc = CreateOptions {
            no_default_ipalloc: true,
            ..opts()
        };
        let plain = json!({"Image": "busybox", "Cmd": ["true"]});
        assert!(matches!(
            plan_create(&plain, &no_alloc).unwrap(),
            CreatePlan::LeaveAlone(_)
        ));
    }

    #[test]
    fn plan_weaves_default_bridge_and_none() {
        for mode in [
            json!(""),
            json!("default"),
            json!("bridge"),
            json!("none"),
            Value::Null,
        ] {
            let body = with_cidr(json!({"Image": "busybox", "HostConfig": {"NetworkMode": mode}}));
            assert_eq!(
                plan(body).unwrap(),
                CreatePlan::Weave {
                    image_to_inspect: Some("busybox".to_string())
                }
            );
        }
        let no_host_config = with_cidr(json!({"Image": "busybox", "HostConfig": null}));
        assert!(matches!(
            plan(no_host_config).unwrap(),
            CreatePlan::Weave { .. }
        ));
    }

    #[test]
    fn plan_inspects_image_only_without_entrypoint() {
        let cases = [
            (json!(null), true),
            (json!([]), true),
            (json!(""), false),
            (json!([""]), false),
            (json!(["/bin/sh"]), false),
            (json!("/bin/sh"), false),
        ];
        for (entrypoint, inspect) in cases {
            let body = with_cidr(json!({"Image": "img", "Entrypoint": entrypoint.clone()}));
            let CreatePlan::Weave { image_to_inspect } = plan(body).unwrap() else {
                panic!("not woven");
            };
            assert_eq!(image_to_inspect.is_some(), inspect, "{entrypoint}");
        }
        let no_image = with_cidr(json!({"Cmd": ["x"]}));
        assert_eq!(
            plan(no_image).unwrap(),
            CreatePlan::Weave {
                image_to_inspect: None
            }
        );
    }

    #[test]
    fn plan_rejects_bad_or_ipam_cidrs() {
        let bad = json!({"Env": ["WEAVE_CIDR=10.1.1/24"]});
        let err = plan(bad).unwrap_err();
        assert_eq!(err.status(), 400);
        assert!(err.to_string().contains("\"10.1.1/24\""), "{err}");
        let mixed = json!({"Env": ["WEAVE_CIDR=none 10.1.1.1/24"]});
        assert_eq!(plan(mixed).unwrap_err().status(), 400);

        // No WEAVE_CIDR and `net:` forms are woven: the router asks IPAM at attach time.
        for env in [
            json!([]),
            json!(["WEAVE_CIDR="]),
            json!(["WEAVE_CIDR=  "]),
            Value::Null,
            json!(["WEAVE_CIDR=10.1.1.1/24 net:10.2.0.7/16"]),
            json!(["WEAVE_CIDR=net:default"]),
        ] {
            let body = json!({ "Env": env, "Entrypoint": ["x"] });
            assert!(
                matches!(plan(body).unwrap(), CreatePlan::Weave { .. }),
                "{env}"
            );
        }
        let explicit =
            json!({"Env": ["WEAVE_CIDR=ip:10.1.1.1/24 10.1.1.2/24"], "Entrypoint": ["x"]});
        assert!(matches!(plan(explicit).unwrap(), CreatePlan::Weave { .. }));
    }

    #[test]
    fn plan_type_errors() {
        for body in [
            json!({"HostConfig": []}),
            json!({"HostConfig": {"NetworkMode": 1}}),
            json!({"Env": "WEAVE_CIDR=10.1.1.1/24", "Entrypoint": 5}),
            json!({"Env": [1]}),
            json!([]),
        ] {
            let err = plan(body.clone()).unwrap_err();
            assert_eq!(err.status(), 500, "{body}");
        }
    }

    #[test]
    fn binds_replace_w_and_append() {
        let body = with_cidr(json!({
            "Entrypoint": ["/bin/sh"],
            "HostConfig": {"Binds": ["/a:/b", "/old:/w", "/old2:/w:ro", "/c:/d:ro", "/w:/x"]}
        }));
        let out = rewrite(body, None).unwrap();
        assert_eq!(
            out["HostConfig"]["Binds"],
            json!([
                "/a:/b",
                "/c:/d:ro",
                "/w:/x",
                "/var/lib/weave/weavewait/w:/w:ro"
            ])
        );
        let nomcast = CreateOptions {
            no_multicast_route: true,
            ..opts()
        };
        let body = with_cidr(json!({"Entrypoint": "/bin/sh", "HostConfig": {"Binds": "/a:/b"}}));
        let out = rewrite_create(body, None, None, &nomcast).unwrap();
        assert_eq!(
            out["HostConfig"]["Binds"],
            json!(["/a:/b", "/var/lib/weave/weavewait/w-nomcast:/w:ro"])
        );
    }

    #[test]
    fn host_config_created_when_missing() {
        for body in [
            json!({"Cmd": ["x"]}),
            json!({"Cmd": ["x"], "HostConfig": null}),
        ] {
            let out = rewrite(body, None).unwrap();
            assert_eq!(
                out["HostConfig"]["Binds"],
                json!(["/var/lib/weave/weavewait/w:/w:ro"])
            );
        }
    }

    #[test]
    fn entrypoint_merges_image() {
        let img = image(
            Some(&["/docker-entrypoint.sh"]),
            Some(&["nginx", "-g", "daemon off;"]),
        );
        // Absent: image entrypoint and cmd.
        let out = rewrite(json!({"Image": "nginx"}), Some(&img)).unwrap();
        assert_eq!(out["Entrypoint"], json!(["/w/w", "/docker-entrypoint.sh"]));
        assert_eq!(out["Cmd"], json!(["nginx", "-g", "daemon off;"]));
        // Null entrypoint, user cmd: image entrypoint, user cmd.
        let body = json!({"Image": "nginx", "Entrypoint": null, "Cmd": ["sh"]});
        let out = rewrite(body, Some(&img)).unwrap();
        assert_eq!(out["Entrypoint"], json!(["/w/w", "/docker-entrypoint.sh"]));
        assert_eq!(out["Cmd"], json!(["sh"]));
        // [] entrypoint: no image entrypoint, image cmd when none given.
        let body = json!({"Image": "nginx", "Entrypoint": [], "Cmd": []});
        let out = rewrite(body, Some(&img)).unwrap();
        assert_eq!(out["Entrypoint"], json!(["/w/w"]));
        assert_eq!(out["Cmd"], json!(["nginx", "-g", "daemon off;"]));
        // Given entrypoint: image not consulted.
        let body = json!({"Image": "nginx", "Entrypoint": "/bin/sh", "Cmd": "-c"});
        let out = rewrite(body, None).unwrap();
        assert_eq!(out["Entrypoint"], json!(["/w/w", "/bin/sh"]));
        assert_eq!(out["Cmd"], json!("-c"));
    }

    #[test]
    fn image_cmd_only() {
        let img = image(None, Some(&["sh"]));
        let out = rewrite(json!({"Image": "busybox", "Cmd": null}), Some(&img)).unwrap();
        assert_eq!(out["Entrypoint"], json!(["/w/w"]));
        assert_eq!(out["Cmd"], json!(["sh"]));
    }

    #[test]
    fn weavewait_not_doubled() {
        let body = json!({"Entrypoint": ["/w/w", "/bin/app"], "Cmd": ["x"]});
        let out = rewrite(body, None).unwrap();
        assert_eq!(out["Entrypoint"], json!(["/w/w", "/bin/app"]));
        // Also when it comes from a committed image.
        let img = image(Some(&["/w/w", "/bin/app"]), None);
        let out = rewrite(json!({"Image": "committed"}), Some(&img)).unwrap();
        assert_eq!(out["Entrypoint"], json!(["/w/w", "/bin/app"]));
    }

    #[test]
    fn empty_entrypoint_string_pitfall() {
        let img = image(Some(&["/entry"]), Some(&["imgcmd"]));
        let body = json!({"Image": "x", "Entrypoint": [""], "Cmd": ["ls", "/"]});
        let out = rewrite(body, Some(&img)).unwrap();
        assert_eq!(out["Entrypoint"], json!(["/w/w"]));
        assert_eq!(out["Cmd"], json!(["ls", "/"]));
        let body = json!({"Image": "x", "Entrypoint": [""], "Cmd": null});
        let err = rewrite(body, Some(&img)).unwrap_err();
        assert!(matches!(err, RewriteError::NoCommandSpecified));
        // A string "" entrypoint is the same strslice [""].
        let body = json!({"Image": "x", "Entrypoint": "", "Cmd": "ls"});
        assert_eq!(rewrite(body, None).unwrap()["Entrypoint"], json!(["/w/w"]));
    }

    #[test]
    fn no_command_specified() {
        let err = rewrite(json!({"Image": "scratchy"}), Some(&ImageConfig::default())).unwrap_err();
        assert_eq!(err.to_string(), "No command specified");
        assert_eq!(err.status(), 500);
        let err = rewrite(json!({"Cmd": []}), None).unwrap_err();
        assert!(matches!(err, RewriteError::NoCommandSpecified));
    }

    #[test]
    fn missing_image_config_is_an_error() {
        let err = rewrite(json!({"Image": "busybox"}), None).unwrap_err();
        assert!(matches!(err, RewriteError::ImageNotInspected(_)));
    }

    #[test]
    fn hostname_and_domain() {
        let out = rewrite(json!({"Cmd": ["x"]}), None).unwrap();
        assert_eq!(out["Hostname"], json!("c1"));
        assert_eq!(out["Domainname"], json!("weave.local"));
        // The client's own hostname wins.
        let out = rewrite(json!({"Cmd": ["x"], "Hostname": "mine"}), None).unwrap();
        assert_eq!(out["Hostname"], json!("mine"));
        assert!(out.get("Domainname").is_none());
        // No name: nothing set.
        let out = rewrite_create(json!({"Cmd": ["x"]}), None, None, &opts()).unwrap();
        assert!(out.get("Hostname").is_none());
    }

    #[test]
    fn hostname_length_limit() {
        // 52 + 1 + 11 ("weave.local") = 64: allowed; one more is not.
        let ok = "a".repeat(52);
        let out = rewrite_create(json!({"Cmd": ["x"]}), Some(&ok), None, &opts()).unwrap();
        assert_eq!(out["Hostname"], json!(ok));
        let long = "a".repeat(53);
        let out = rewrite_create(json!({"Cmd": ["x"]}), Some(&long), None, &opts()).unwrap();
        assert!(out.get("Hostname").is_none());
        assert!(out.get("Domainname").is_none());
        // The name still counts for DnsSearch.
        assert_eq!(out["HostConfig"]["DnsSearch"], json!(["."]));
    }

    #[test]
    fn dns_appended_and_search() {
        let body = json!({"Cmd": ["x"], "HostConfig": {"Dns": ["8.8.8.8"], "DnsSearch": null}});
        let out = rewrite(body, None).unwrap();
        assert_eq!(out["HostConfig"]["Dns"], json!(["8.8.8.8", "172.17.0.1"]));
        assert_eq!(out["HostConfig"]["DnsSearch"], json!(["."]));
        let body = json!({"Cmd": ["x"], "HostConfig": {"DnsSearch": ["corp"]}});
        let out = rewrite_create(body, None, None, &opts()).unwrap();
        assert_eq!(out["HostConfig"]["Dns"], json!(["172.17.0.1"]));
        assert_eq!(out["HostConfig"]["DnsSearch"], json!(["corp"]));
        let out = rewrite_create(json!({"Cmd": ["x"]}), None, None, &opts()).unwrap();
        assert_eq!(out["HostConfig"]["DnsSearch"], json!(["weave.local."]));
    }

    #[test]
    fn dns_untouched_without_server_or_with_without_dns() {
        let no_server = CreateOptions {
            dns_server: None,
            ..opts()
        };
        let out = rewrite_create(json!({"Cmd": ["x"]}), Some("c1"), None, &no_server).unwrap();
        assert!(out["HostConfig"].get("Dns").is_none());
        assert!(out["HostConfig"].get("DnsSearch").is_none());
        assert_eq!(out["Hostname"], json!("c1"));
        let without = CreateOptions {
            without_dns: true,
            ..opts()
        };
        let body = json!({"Cmd": ["x"], "Labels": 5});
        let out = rewrite_create(body, Some("c1"), None, &without).unwrap();
        assert!(out["HostConfig"].get("Dns").is_none());
        assert!(out.get("Hostname").is_none());
    }

    #[test]
    fn hostname_from_label_and_bad_labels() {
        let labelled = CreateOptions {
            hostname: HostnameRule::new("(.*)", "$1", Some("weave.hostname")).unwrap(),
            ..opts()
        };
        let body = json!({"Cmd": ["x"], "Labels": {"weave.hostname": "lbl"}});
        let out = rewrite_create(body, Some("c1"), None, &labelled).unwrap();
        assert_eq!(out["Hostname"], json!("lbl"));
        let body = json!({"Cmd": ["x"], "Labels": ["weave.hostname=lbl"]});
        let err = rewrite_create(body, Some("c1"), None, &labelled).unwrap_err();
        assert_eq!(err.status(), 500);
    }

    #[test]
    fn wrong_types() {
        for body in [
            json!({"Cmd": 1}),
            json!({"Cmd": ["x"], "Entrypoint": {"a": 1}}),
            json!({"Cmd": ["x"], "HostConfig": {"Binds": [1]}}),
            json!({"Cmd": ["x"], "HostConfig": 3}),
            json!({"Cmd": ["x"], "Hostname": 3}),
            json!({"Cmd": ["x"], "HostConfig": {"Dns": "8.8.8.8", "DnsSearch": 1}}),
            json!("x"),
        ] {
            let err = rewrite(body.clone(), None).unwrap_err();
            assert_eq!(err.status(), 500, "{body}: {err}");
        }
    }
}
