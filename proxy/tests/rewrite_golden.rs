//! Golden tests of the create rewrite on request bodies as real clients send them.
//!
//! `tests/fixtures/create/<case>.request.json` is what the client sent; `<case>.expected.json`
//! is what the proxy must forward (compared after compacting, so key order and number text
//! count). Run with `WEAVE_BLESS=1` to rewrite the expected files after a deliberate change.

#![allow(clippy::unwrap_used)] // tests may panic on bad fixtures

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde_json::Value;
use weave_proxy::hostname::HostnameRule;
use weave_proxy::rewrite::{plan_create, rewrite_create, CreateOptions, CreatePlan, ImageConfig};

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

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/create")
        .join(name)
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn busybox() -> ImageConfig {
    ImageConfig {
        entrypoint: None,
        cmd: Some(strings(&["sh"])),
    }
}

fn nginx() -> ImageConfig {
    ImageConfig {
        entrypoint: Some(strings(&["/docker-entrypoint.sh"])),
        cmd: Some(strings(&["nginx", "-g", "daemon off;"])),
    }
}

/// Plans and rewrites one fixture; checks the image lookup the plan asked for.
fn woven(
    case: &str,
    name: Option<&str>,
    expect_inspect: Option<&str>,
    image: Option<ImageConfig>,
) -> String {
    let request = std::fs::read(fixture(&format!("{case}.request.json"))).unwrap();
    let body: Value = serde_json::from_slice(&request).unwrap();
    let plan = plan_create(&body, &opts()).unwrap();
    assert_eq!(
        plan,
        CreatePlan::Weave {
            image_to_inspect: expect_inspect.map(str::to_string)
        },
        "{case}"
    );
    let out = rewrite_create(body, name, image.as_ref(), &opts()).unwrap();
    let got = serde_json::to_string(&out).unwrap();

    let expected_path = fixture(&format!("{case}.expected.json"));
    if std::env::var_os("WEAVE_BLESS").is_some() {
        let pretty = serde_json::to_string_pretty(&out).unwrap();
        std::fs::write(&expected_path, pretty + "\n").unwrap();
    }
    let expected: Value = serde_json::from_slice(&std::fs::read(&expected_path).unwrap()).unwrap();
    assert_eq!(got, serde_json::to_string(&expected).unwrap(), "{case}");
    got
}

/// Every key of the request keeps its relative order in the output.
fn assert_key_order_kept(request: &Value, out: &Value) {
    if let (Some(req), Some(out)) = (request.as_object(), out.as_object()) {
        let positions: Vec<usize> = req
            .keys()
            .map(|k| out.keys().position(|o| o == k).unwrap())
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    }
}

#[test]
fn docker_cli_20_10_run() {
    // docker run -d --name c1 -e WEAVE_CIDR=10.35.1.1/24 busybox sleep 1000
    let got = woven(
        "cli-20.10-run",
        Some("c1"),
        Some("busybox"),
        Some(busybox()),
    );
    assert!(got.contains(r#""Memory":9007199254740993,"#));
    assert!(got.contains(r#""MemorySwap":-1,"#));
    assert!(got.contains(r#""Entrypoint":["/w/w"],"#));
    assert!(got.contains(r#""Cmd":["sleep","1000"],"#));
    assert!(got.contains(r#""Binds":["/var/lib/weave/weavewait/w:/w:ro"],"#));
    let request: Value =
        serde_json::from_slice(&std::fs::read(fixture("cli-20.10-run.request.json")).unwrap())
            .unwrap();
    let out: Value = serde_json::from_str(&got).unwrap();
    assert_key_order_kept(&request, &out);
    assert_key_order_kept(&request["HostConfig"], &out["HostConfig"]);
}

#[test]
fn docker_cli_28_nginx_with_image_defaults() {
    // docker run -d -p 8080:80 --memory ... --dns 8.8.8.8 --dns-search corp.example
    //   -v /srv/data:/data:ro -v /tmp/old-weavewait/w:/w:ro nginx:1.27 (no --name)
    let got = woven("cli-28-nginx", None, Some("nginx:1.27"), Some(nginx()));
    assert!(got.contains(r#""MemorySwap":18446744073709551615,"#));
    assert!(got.contains(r#""Entrypoint":["/w/w","/docker-entrypoint.sh"],"#));
    assert!(got.contains(r#""Cmd":["nginx","-g","daemon off;"],"#));
    assert!(got.contains(r#""Dns":["8.8.8.8","172.17.0.1"],"#));
    assert!(got.contains(r#""DnsSearch":["corp.example"],"#));
    assert!(!got.contains("old-weavewait"));
}

#[test]
fn docker_cli_entrypoint_reset() {
    // docker run --rm --entrypoint= -e WEAVE_CIDR=10.35.1.2/24 busybox ls /
    let got = woven("cli-entrypoint-reset", Some("/lister"), None, None);
    assert!(got.contains(r#""Entrypoint":["/w/w"],"#));
    assert!(got.contains(r#""Hostname":"lister","Domainname":"weave.local","#));
}

#[test]
fn compose_v1_bridge() {
    // docker-compose 1.29 service with `network_mode: bridge`.
    let got = woven(
        "compose-v1-bridge",
        Some("proj_web_1"),
        Some("nginx:alpine"),
        Some(nginx()),
    );
    assert!(got.contains(r#""Hostname":"proj_web_1","Domainname":"weave.local","#));
    assert!(got.contains(r#""NetworkingConfig":null,"#));
}

#[test]
fn compose_v1_project_network_left_alone() {
    let request = std::fs::read(fixture("compose-v1-project-net.request.json")).unwrap();
    let body: Value = serde_json::from_slice(&request).unwrap();
    assert!(matches!(
        plan_create(&body, &opts()).unwrap(),
        CreatePlan::LeaveAlone(_)
    ));
}
