//! `run` end to end: the HTTP API driven by the real client, in a throw-away netns (root only).

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{in_new_netns, link_exists, FakeContainer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use weave_api::client::RouterClient;
use weave_router::api_types::{AttachRequest, DetachRequest};
use weave_router::containers::{ContainerDirectory, ContainerError, ContainerProcess};
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

/// Containers by id, standing in for dockerd.
#[derive(Default)]
struct Table(Mutex<HashMap<String, i32>>);

impl Table {
    fn add(&self, id: &str, pid: i32) {
        self.0.lock().expect("table").insert(id.to_string(), pid);
    }
}

impl ContainerDirectory for Table {
    fn lookup<'a>(
        &'a self,
        id: &'a str,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<Option<ContainerProcess>, ContainerError>>
                + Send
                + 'a,
        >,
    > {
        let found = self
            .0
            .lock()
            .expect("table")
            .get(id)
            .map(|&pid| ContainerProcess {
                id: format!("{id}-full"),
                running: true,
                pid,
            });
        Box::pin(async move { Ok(found) })
    }
}

/// Send raw bytes over TCP, return the status line.
async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    raw_on(stream, request).await
}

/// Send raw bytes over the unix socket, return the status line.
async fn raw_unix(path: &Path, request: &[u8]) -> String {
    let stream = tokio::net::UnixStream::connect(path)
        .await
        .expect("connect");
    raw_on(stream, request).await
}

async fn raw_on(mut stream: impl AsyncRead + AsyncWrite + Unpin, request: &[u8]) -> String {
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
        let dir = std::env::temp_dir().join(format!("weave-api-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let socket = dir.join("router.sock");
        let config = RouterConfig {
            http_addr: addr,
            api_socket: socket.clone(),
            api_socket_group: 0,
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
            ipam: None,
            ipam_state: std::env::temp_dir().join("weave-ipam-unused.json"),
            dns: None,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let table = Arc::new(Table::default());
        let router = tokio::spawn(run(config, table.clone(), async {
            let _ = stopped.await;
        }));
        let client = RouterClient::new(addr, &socket);
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
        table.add("aaaa", a.pid());
        table.add("bbbb", b.pid());
        {
            use std::os::unix::fs::{MetadataExt, PermissionsExt};
            let meta = std::fs::metadata(&socket).expect("API socket");
            assert_eq!(meta.permissions().mode() & 0o777, 0o660);
            assert_eq!((meta.uid(), meta.gid()), (0, 0));
        }
        // Only the unix socket changes things; TCP refuses, whoever asks.
        for (method, path) in [
            ("POST", "/attach/aaaa"),
            ("POST", "/detach/aaaa"),
            ("POST", "/expose/10.40.1.254/24"),
            ("DELETE", "/expose/10.40.1.254/24"),
            ("POST", "/connect"),
            ("POST", "/forget"),
            ("GET", "/interfaces/1"),
        ] {
            let request = format!(
                "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{{}}"
            );
            let status = raw(addr, request.as_bytes()).await;
            assert!(
                status.contains(" 403 "),
                "{method} {path} over TCP: {status}"
            );
        }
        let tcp_only = RouterClient::new(addr, dir.join("no-such.sock"));
        assert!(tcp_only.get_text("/status").await.is_ok());
        // A PID that is not the named container's, and a container dockerd does not know.
        let err = client
            .attach("aaaa", &attach_req(b.pid(), &["10.40.1.1/24"]))
            .await
            .expect_err("pid of another container");
        assert_eq!(err.status(), Some(400), "{err}");
        let stranger = FakeContainer::isolated();
        let err = client
            .attach("nobody", &attach_req(stranger.pid(), &["10.40.1.1/24"]))
            .await
            .expect_err("not a container");
        assert_eq!(err.status(), Some(404), "{err}");
        for wide in [
            "10.0.0.1/0",
            "10.40.1.1/7",
            "10.40.1.0/24",
            "10.40.1.255/24",
        ] {
            let err = client
                .attach("aaaa", &attach_req(a.pid(), &[wide]))
                .await
                .expect_err(wide);
            assert_eq!(err.status(), Some(400), "{wide}: {err}");
            let err = client
                .expose(wide.parse().expect("cidr"))
                .await
                .expect_err(wide);
            assert_eq!(err.status(), Some(400), "expose {wide}: {err}");
        }
        assert!(!link_exists(&weave_router::bridge::host_veth_name(a.pid())));
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
        table.add("dddd", host.pid());
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
            .attach("aaaa", &attach_req(0, &["10.40.1.9/24"]))
            .await
            .expect_err("pid 0");
        assert_eq!(err.status(), Some(400));
        let err = client.get_text("/nope").await.expect_err("404");
        assert_eq!(err.status(), Some(404));
        assert!(raw_unix(&socket, b"POST /attach/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 7\r\n\r\n{\"pid\":")
            .await
            .contains(" 400 "));
        let mut big = b"POST /attach/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 100000\r\n\r\n".to_vec();
        big.extend(std::iter::repeat_n(b' ', 100_000));
        assert!(raw_unix(&socket, &big).await.contains(" 400 "));

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
        assert!(!socket.exists(), "the API socket is removed at shutdown");
        let _ = std::fs::remove_dir_all(&dir);
    });
}
