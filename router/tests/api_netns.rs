//! `run` end to end: the HTTP API driven by the real client, in a throw-away netns (root only).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{in_new_netns, link_exists, FakeContainer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weave_router::api_types::{AttachRequest, DetachRequest};
use weave_router::client::RouterClient;
use weave_router::{run, RouterConfig};

const API: &str = "127.0.0.1:6784";

fn attach_req(pid: i32, addrs: &[&str]) -> AttachRequest {
    AttachRequest {
        pid,
        addrs: addrs
            .iter()
            .map(|a| a.parse().expect("valid spec"))
            .collect(),
        no_multicast_route: false,
        keep_tx_on: false,
    }
}

/// Send raw bytes, return the status line.
async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    // The server may answer (and close) before it has read everything we send.
    let _ = stream.write_all(request).await;
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut reply)).await;
    String::from_utf8_lossy(&reply)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn api_end_to_end() {
    in_new_netns(|| async {
        let addr: SocketAddr = API.parse().expect("address");
        let config = RouterConfig {
            http_addr: addr,
            bridge_name: "weave".into(),
            mtu: 1376,
            nickname: "testhost".into(),
            proxy_addrs: vec!["unix:///var/run/weave/weave.sock".into()],
            version: "9.9.9".into(),
            port: weave_router::MESH_PORT,
            password: None,
            peers: Vec::new(),
            discovery: true,
            conn_limit: weave_router::DEFAULT_CONN_LIMIT,
            trusted_subnets: Vec::new(),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let router = tokio::spawn(run(config, async {
            let _ = stopped.await;
        }));
        let client = RouterClient::new(addr);
        let mut ready = false;
        for _ in 0..500 {
            if client.get_text("/status").await.is_ok() {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(ready, "router API did not come up");

        // Status, report, proxy addresses.
        let status = client.get_text("/status").await.expect("status");
        assert!(status.starts_with("        Version: 9.9.9 (version check update disabled)\n"));
        assert!(status.contains("           Name: "), "{status}");
        assert!(status.contains("(testhost)\n"), "{status}");
        assert!(status.contains("          Peers: 1\n"), "{status}");
        assert!(status.contains("        Address: unix:///var/run/weave/weave.sock\n"));
        assert_eq!(
            client.get_text("/status/connections").await.expect("conns"),
            ""
        );
        let report = client.report().await.expect("report");
        assert_eq!(report["Version"], "9.9.9");
        assert_eq!(report["Router"]["NickName"], "testhost");
        assert_eq!(report["Router"]["Peers"].as_array().map(Vec::len), Some(1));
        assert_eq!(report["Router"]["TrustedSubnets"], serde_json::json!([]));
        // The sleeve's capture, once the data plane runs.
        let mut sleeve = report["Router"].clone();
        for _ in 0..500 {
            if sleeve["Interface"] != "" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            sleeve = client.report().await.expect("report")["Router"].clone();
        }
        assert_eq!(sleeve["Interface"], "vethwe-pcap (via pcap)");
        assert!(
            sleeve["CaptureStats"]["PacketsReceived"].is_u64(),
            "{}",
            sleeve["CaptureStats"]
        );
        assert_eq!(
            client.get_text("/proxyaddrs").await.expect("proxyaddrs"),
            "unix:///var/run/weave/weave.sock\n"
        );

        // Attach two containers in one /24; they can talk.
        let a = FakeContainer::isolated();
        let b = FakeContainer::isolated();
        let ra = client
            .attach(
                "aaaa",
                &attach_req(a.pid(), &["10.40.1.1/24", "10.40.2.1/24"]),
            )
            .await
            .expect("attach a");
        assert_eq!(ra.addrs, ["10.40.1.1/24", "10.40.2.1/24"]);
        let rb = client
            .attach("bbbb", &attach_req(b.pid(), &["ip:10.40.1.2/24"]))
            .await
            .expect("attach b");
        assert_eq!(rb.addrs, ["10.40.1.2/24"]);
        assert!(a.try_run("ping", &["-c", "1", "-W", "5", "10.40.1.2"]));
        assert!(b.try_run("ping", &["-c", "1", "-W", "5", "10.40.1.1"]));

        // weave ps.
        let info = client
            .interfaces(&a.pid().to_string())
            .await
            .expect("interfaces")
            .expect("a is attached");
        assert_eq!(info.mac, ra.mac);
        let bare = FakeContainer::isolated();
        assert_eq!(
            client
                .interfaces(&bare.pid().to_string())
                .await
                .expect("bare"),
            None
        );
        assert_eq!(
            client
                .interfaces("weave:expose")
                .await
                .expect("bridge")
                .map(|i| i.addrs),
            Some(vec![])
        );

        // Expose / hide.
        let exposed = "10.40.1.254/24".parse().expect("cidr");
        client.expose(exposed).await.expect("expose");
        client.expose(exposed).await.expect("expose twice");
        let bridge = client
            .interfaces("weave:expose")
            .await
            .expect("bridge")
            .expect("bridge exists");
        assert_eq!(bridge.addrs, ["10.40.1.254/24"]);
        common::sh("ping", &["-c", "1", "-W", "5", "10.40.1.1"]);
        client.hide(exposed).await.expect("hide");
        client.hide(exposed).await.expect("hide twice");

        // Refusals.
        let err = client
            .attach("cccc", &attach_req(a.pid(), &["net:default"]))
            .await
            .expect_err("IPAM");
        assert_eq!(err.status(), Some(400));
        assert!(err.to_string().contains("IPAM"), "{err}");
        let host = FakeContainer::in_our_netns();
        let err = client
            .attach("dddd", &attach_req(host.pid(), &["10.40.1.9/24"]))
            .await
            .expect_err("host netns");
        assert_eq!(err.status(), Some(400));
        assert_eq!(
            err.to_string(),
            "Container is running in the host network namespace"
        );
        let err = client
            .attach("eeee", &attach_req(0, &["10.40.1.9/24"]))
            .await
            .expect_err("pid 0");
        assert_eq!(err.status(), Some(400));
        let err = client.get_text("/nope").await.expect_err("404");
        assert_eq!(err.status(), Some(404));
        assert!(raw(addr, b"POST /attach/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 7\r\n\r\n{\"pid\":")
            .await
            .contains(" 400 "));
        let mut big = b"POST /attach/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 100000\r\n\r\n".to_vec();
        big.extend(std::iter::repeat_n(b' ', 100_000));
        assert!(raw(addr, &big).await.contains(" 400 "));

        // Detach.
        let removed = client
            .detach(
                "aaaa",
                &DetachRequest {
                    pid: a.pid(),
                    addrs: vec!["10.40.2.1/24".parse().expect("spec")],
                },
            )
            .await
            .expect("detach");
        assert_eq!(removed.removed, ["10.40.2.1/24"]);

        // Shutdown leaves the bridge and containers connected.
        let _ = stop.send(());
        router
            .await
            .expect("router task")
            .expect("router stopped cleanly");
        assert!(link_exists("weave"));
        assert!(a.try_run("ping", &["-c", "1", "-W", "5", "10.40.1.2"]));
        assert!(client.get_text("/status").await.is_err());
    });
}
