//! The create and start body rewrites, on arbitrary JSON.
//!
//! Invariants: the output is valid JSON (it serialises and parses back to itself); fields the
//! rewrite does not own are kept exactly; the entrypoint starts with weavewait; exactly one
//! bind is mounted at `/w`; rewriting the output again changes nothing.
#![no_main]

use std::net::Ipv4Addr;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use weave_proxy::rewrite::{
    parse_object, plan_create, rewrite_create, rewrite_start_body, CreateOptions, CreatePlan,
    ImageConfig,
};

fn options() -> &'static [CreateOptions; 4] {
    static OPTS: OnceLock<[CreateOptions; 4]> = OnceLock::new();
    OPTS.get_or_init(|| {
        [0u8, 1, 2, 3].map(|i| CreateOptions {
            weavewait_dir: "/var/lib/weave/weavewait".into(),
            no_multicast_route: i & 1 != 0,
            without_dns: i == 3,
            dns_domain: "weave.local.".into(),
            dns_server: (i & 2 == 0).then_some(Ipv4Addr::new(172, 17, 0, 1)),
            hostname: Default::default(),
            no_default_ipalloc: i == 1,
        })
    })
}

/// Every field of `before` outside `owned` is in `after`, unchanged.
fn kept(before: &Map<String, Value>, after: &Map<String, Value>, owned: &[&str]) {
    for (k, v) in before {
        if !owned.contains(&k.as_str()) {
            assert_eq!(after.get(k), Some(v), "field {k:?} changed");
        }
    }
}

fn valid_json(v: &Value) {
    let text = serde_json::to_string(v).expect("serialises");
    let back: Value = serde_json::from_str(&text).expect("the output is valid JSON");
    assert_eq!(&back, v);
}

fn one_weavewait_bind(host_config: &Map<String, Value>) {
    let binds = host_config["Binds"].as_array().expect("Binds is a list");
    let at_w = binds
        .iter()
        .filter(|b| b.as_str().expect("binds are strings").split(':').nth(1) == Some("/w"))
        .count();
    assert_eq!(at_w, 1, "{binds:?}");
}

const HOST_CONFIG_OWNED: &[&str] = &["Binds", "Dns", "DnsSearch"];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let opts = &options()[usize::from(selector & 3)];
    let image = ImageConfig {
        entrypoint: (selector & 4 != 0).then(|| vec!["/entry".to_string()]),
        cmd: (selector & 8 != 0).then(|| vec!["sh".to_string(), "-c".to_string()]),
    };
    let name = (selector & 16 != 0).then_some("/c1");

    if let Ok(value) = parse_object(body) {
        if let Ok(CreatePlan::Weave { image_to_inspect }) = plan_create(&value, opts) {
            let image = image_to_inspect.as_ref().map(|_| &image);
            if let Ok(out) = rewrite_create(value.clone(), name, image, opts) {
                valid_json(&out);
                let (before, after) = (
                    value.as_object().expect("object"),
                    out.as_object().expect("object"),
                );
                kept(
                    before,
                    after,
                    &["Entrypoint", "Cmd", "Hostname", "Domainname", "HostConfig"],
                );
                let entrypoint = after["Entrypoint"]
                    .as_array()
                    .expect("Entrypoint is a list");
                assert_eq!(entrypoint.first().and_then(Value::as_str), Some("/w/w"));
                let hc = after["HostConfig"]
                    .as_object()
                    .expect("HostConfig is an object");
                if let Some(Value::Object(hc_before)) = before.get("HostConfig") {
                    kept(hc_before, hc, HOST_CONFIG_OWNED);
                }
                one_weavewait_bind(hc);
                let twice = rewrite_create(out.clone(), name, image, opts)
                    .expect("a rewritten body rewrites");
                assert_eq!(twice, out, "rewriting twice changes nothing");
            }
        }
    }

    if let Ok(Some(out)) = rewrite_start_body(body, opts, "host.weave.local") {
        valid_json(&out);
        let before: Value = serde_json::from_slice(body).expect("it parsed in the rewrite");
        let (before, after) = (
            before.as_object().expect("object"),
            out.as_object().expect("object"),
        );
        let hc = match before.get("HostConfig") {
            Some(Value::Object(hc_before)) => {
                kept(before, after, &["HostConfig"]);
                let hc = after["HostConfig"]
                    .as_object()
                    .expect("HostConfig stays an object");
                kept(hc_before, hc, HOST_CONFIG_OWNED);
                hc
            }
            _ => {
                kept(before, after, HOST_CONFIG_OWNED);
                after
            }
        };
        one_weavewait_bind(hc);
        let text = serde_json::to_vec(&out).expect("serialises");
        let twice =
            rewrite_start_body(&text, opts, "host.weave.local").expect("a rewritten body rewrites");
        assert_eq!(
            twice.as_ref(),
            Some(&out),
            "rewriting twice changes nothing"
        );
    }
});
