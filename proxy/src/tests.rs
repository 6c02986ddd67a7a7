//! End-to-end tests of the shell: the real [`crate::run_with`] on a temporary unix socket, raw
//! request bytes from a client, and a scripted fake dockerd on another unix socket. Side calls
//! (inspect, kill, events) and the router are in-memory fakes. No root needed.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use weave_api::client::ClientError;
use weave_api::types::{AttachRequest, AttachResponse, InterfaceInfo};

use crate::attach::Network;
use crate::docker::{ContainerEvent, DockerApi, DockerError, EventAction};
use crate::rewrite::hostname::HostnameRule;
use crate::rewrite::{CreateOptions, ImageConfig};
use crate::{run_with, ProxyConfig, ProxyError, Upstream};

/// Upper bound for anything a test waits for.
const PATIENCE: Duration = Duration::from_secs(10);

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(PATIENCE, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

fn temp_dir() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "weave-proxy-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

// ---- fakes ----------------------------------------------------------------------------------

#[derive(Default)]
struct FakeDocker {
    containers: Mutex<HashMap<String, Value>>,
    images: Mutex<HashMap<String, ImageConfig>>,
    killed: Mutex<Vec<String>>,
    running: Mutex<Vec<String>>,
    events: Mutex<Option<mpsc::UnboundedReceiver<ContainerEvent>>>,
}

impl FakeDocker {
    fn add_container(&self, inspect: Value) {
        let id = inspect["Id"].as_str().expect("Id").to_string();
        lock(&self.containers).insert(id, inspect);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl DockerApi for FakeDocker {
    fn inspect_container<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Value, DockerError>> {
        let found = lock(&self.containers)
            .iter()
            .find(|(full, v)| full.starts_with(id) || v["Name"].as_str() == Some(&format!("/{id}")))
            .map(|(_, v)| v.clone());
        async move { found.ok_or_else(|| DockerError::NoSuchContainer(id.to_string())) }.boxed()
    }

    fn inspect_image<'a>(
        &'a self,
        image: &'a str,
    ) -> BoxFuture<'a, Result<ImageConfig, DockerError>> {
        let found = lock(&self.images).get(image).cloned();
        async move { found.ok_or_else(|| DockerError::NoSuchImage(image.to_string())) }.boxed()
    }

    fn kill_container<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), DockerError>> {
        lock(&self.killed).push(id.to_string());
        async { Ok(()) }.boxed()
    }

    fn running_containers(&self) -> BoxFuture<'_, Result<Vec<String>, DockerError>> {
        let running = lock(&self.running).clone();
        async move { Ok(running) }.boxed()
    }

    fn container_events(
        &self,
        _since: i64,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Result<ContainerEvent, DockerError>>, DockerError>>
    {
        let stream = match lock(&self.events).take() {
            Some(rx) => futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|event| (Ok(event), rx))
            })
            .boxed(),
            None => futures::stream::pending().boxed(),
        };
        async move { Ok(stream) }.boxed()
    }
}

#[derive(Default)]
struct FakeNetwork {
    attaches: Mutex<Vec<(String, AttachRequest)>>,
    fail_with: Mutex<Option<String>>,
    interface: Mutex<Option<InterfaceInfo>>,
    attached: tokio::sync::Notify,
}

impl Network for FakeNetwork {
    fn attach<'a>(
        &'a self,
        container_id: &'a str,
        req: &'a AttachRequest,
    ) -> BoxFuture<'a, Result<AttachResponse, ClientError>> {
        lock(&self.attaches).push((container_id.to_string(), req.clone()));
        self.attached.notify_waiters();
        let result = match lock(&self.fail_with).clone() {
            Some(message) => Err(ClientError::Status {
                status: 500,
                message,
            }),
            None => Ok(AttachResponse {
                mac: "02:00:00:00:00:01".into(),
                addrs: vec!["10.2.1.1/24".into()],
            }),
        };
        async move { result }.boxed()
    }

    fn interfaces(&self, _pid: i32) -> BoxFuture<'_, Result<Option<InterfaceInfo>, ClientError>> {
        let found = lock(&self.interface).clone();
        async move { Ok(found) }.boxed()
    }
}

/// A fake dockerd: each accepted connection goes to `script` with its sequence number.
struct FakeDockerd {
    connections: Arc<AtomicUsize>,
    _task: JoinHandle<()>,
}

impl FakeDockerd {
    fn start<F, Fut>(path: &Path, script: F) -> Self
    where
        F: Fn(UnixStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = UnixListener::bind(path).expect("bind fake dockerd");
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(script(stream));
            }
        });
        Self {
            connections,
            _task: task,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// Reads one request (head and Content-Length body) as a fake dockerd sees it.
async fn read_request(stream: &mut UnixStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.expect("read request");
        assert!(n > 0, "client closed before the end of the head: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let mut chunk = vec![0u8; length - body.len()];
        let n = stream.read(&mut chunk).await.expect("read body");
        assert!(n > 0, "client closed in the body");
        body.extend_from_slice(&chunk[..n]);
    }
    (head, body)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads a reply head (up to the blank line) and returns it with the bytes after it.
async fn read_head(stream: &mut UnixStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            let rest = buf.split_off(i + 4);
            return (String::from_utf8_lossy(&buf).into_owned(), rest);
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.expect("read reply");
        assert!(n > 0, "proxy closed before the end of the head: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

// ---- harness --------------------------------------------------------------------------------

struct Harness {
    dir: PathBuf,
    socket: PathBuf,
    upstream: PathBuf,
    docker: Arc<FakeDocker>,
    network: Arc<FakeNetwork>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ProxyError>>>,
}

fn create_options() -> CreateOptions {
    CreateOptions {
        weavewait_dir: PathBuf::from("/var/lib/weave/weavewait"),
        no_multicast_route: false,
        without_dns: false,
        dns_domain: "weave.local.".into(),
        dns_server: Some(Ipv4Addr::new(172, 17, 0, 1)),
        hostname: HostnameRule::new("(.*)", "$1", None).expect("rule"),
        no_default_ipalloc: false,
    }
}

impl Harness {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    async fn start_with(adjust: impl FnOnce(&mut ProxyConfig)) -> Self {
        Self::start_prepared(adjust, |_, _| {}).await
    }

    /// Starts the proxy after `prepare` has set up the fakes.
    async fn start_prepared(
        adjust: impl FnOnce(&mut ProxyConfig),
        prepare: impl FnOnce(&FakeDocker, &FakeNetwork),
    ) -> Self {
        let dir = temp_dir();
        let socket = dir.join("run/weave/weave.sock");
        let upstream = dir.join("docker.sock");
        let mut config = ProxyConfig {
            docker_host: format!("unix://{}", upstream.display()),
            socket_path: socket.clone(),
            router: weave_api::client::RouterClient::new(
                "127.0.0.1:6784".parse().expect("addr"),
                dir.join("run/weave/router.sock"),
            ),
            create: create_options(),
            rewrite_inspect: false,
            no_multicast_route: false,
            keep_tx_on: false,
        };
        adjust(&mut config);
        let docker = Arc::new(FakeDocker::default());
        let network = Arc::new(FakeNetwork::default());
        prepare(&docker, &network);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run_with(
            config,
            Upstream::Unix(upstream.clone()),
            docker.clone(),
            network.clone(),
            async move {
                let _ = stopped.await;
            },
        ));
        within("the proxy socket", async {
            while !socket.exists() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        Self {
            dir,
            socket,
            upstream,
            docker,
            network,
            stop: Some(stop),
            task: Some(task),
        }
    }

    fn dockerd<F, Fut>(&self, script: F) -> FakeDockerd
    where
        F: Fn(UnixStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        FakeDockerd::start(&self.upstream, script)
    }

    async fn connect(&self) -> UnixStream {
        UnixStream::connect(&self.socket)
            .await
            .expect("connect to proxy")
    }

    /// Sends raw bytes and reads the whole reply (the proxy closes after each reply).
    async fn exchange(&self, request: &[u8]) -> String {
        let mut client = self.connect().await;
        client.write_all(request).await.expect("send");
        let mut reply = Vec::new();
        within("the reply", client.read_to_end(&mut reply))
            .await
            .expect("read reply");
        String::from_utf8_lossy(&reply).into_owned()
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let result = within("the proxy to stop", task).await.expect("join");
            assert!(result.is_ok(), "{result:?}");
        }
        assert!(!self.socket.exists(), "socket removed on shutdown");
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn post_json(path: &str, body: &Value) -> Vec<u8> {
    let body = body.to_string();
    format!(
        "POST {path} HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn reply_body(reply: &str) -> &str {
    reply.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

fn message_of(reply: &str) -> String {
    let body: Value = serde_json::from_str(reply_body(reply)).expect("json error body");
    body["message"].as_str().expect("message").to_string()
}

// ---- forwarding -----------------------------------------------------------------------------

#[tokio::test]
async fn plain_get_keeps_prefix_query_and_headers() {
    let h = Harness::start().await;
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let _dockerd = h.dockerd(move |mut s| {
        let seen_tx = seen_tx.clone();
        async move {
            let (head, _) = read_request(&mut s).await;
            let _ = seen_tx.send(head);
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nApi-Version: 1.41\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n[]")
                .await;
        }
    });
    let reply = h
        .exchange(b"GET /v1.41/containers/json?all=1&filters=%7B%7D HTTP/1.1\r\nHost: docker\r\nUser-Agent: Docker-Client/28.1.1 (linux)\r\nX-Odd-CASE: yes\r\n\r\n")
        .await;
    let head = within("dockerd to see the request", seen.recv())
        .await
        .expect("request");
    assert!(
        head.starts_with("GET /v1.41/containers/json?all=1&filters=%7B%7D HTTP/1.1\r\n"),
        "{head}"
    );
    assert!(head.contains("Host: docker\r\n"), "{head}");
    assert!(
        head.contains("User-Agent: Docker-Client/28.1.1 (linux)\r\n"),
        "{head}"
    );
    assert!(
        head.contains("X-Odd-CASE: yes\r\n"),
        "header case kept: {head}"
    );
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    assert!(reply.contains("Api-Version: 1.41\r\n"), "{reply}");
    assert!(
        reply.to_ascii_lowercase().contains("connection: close\r\n"),
        "{reply}"
    );
    assert_eq!(reply_body(&reply), "[]");
    h.stop().await;
}

#[tokio::test]
async fn socket_path_host_header_is_blanked() {
    let h = Harness::start().await;
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let _dockerd = h.dockerd(move |mut s| {
        let seen_tx = seen_tx.clone();
        async move {
            let (head, _) = read_request(&mut s).await;
            let _ = seen_tx.send(head);
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK")
                .await;
        }
    });
    let reply = h
        .exchange(b"GET /v1.21/_ping HTTP/1.1\r\nHost: /var/run/docker.sock\r\nUser-Agent: docker-py/1.10.6\r\n\r\n")
        .await;
    let head = within("dockerd to see the request", seen.recv())
        .await
        .expect("request");
    assert!(head.lines().any(|l| l.trim_end() == "Host:"), "{head}");
    assert!(!head.contains("docker.sock"), "{head}");
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    assert_eq!(reply_body(&reply), "OK");
}

#[tokio::test]
async fn chunked_reply_streams_before_dockerd_finishes() {
    let h = Harness::start().await;
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let go_rx = Arc::new(Mutex::new(Some(go_rx)));
    let _dockerd = h.dockerd(move |mut s| {
        let go_rx = lock(&go_rx).take();
        async move {
            let _ = read_request(&mut s).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n1b\r\n{\"status\":\"start\",\"id\":\"a\"}\r\n")
                .await;
            if let Some(go) = go_rx {
                let _ = go.await;
            }
            let _ = s
                .write_all(b"19\r\n{\"status\":\"die\",\"id\":\"a\"}\r\n0\r\n\r\n")
                .await;
        }
    });
    let mut client = h.connect().await;
    client
        .write_all(b"GET /v1.41/events HTTP/1.1\r\nHost: docker\r\n\r\n")
        .await
        .expect("send");
    let (head, mut seen) = within("the reply head", read_head(&mut client)).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    // The first event arrives while dockerd still holds the second one back.
    within("the first chunk", async {
        while find(&seen, b"\"start\"").is_none() {
            let mut chunk = [0u8; 1024];
            let n = client.read(&mut chunk).await.expect("read");
            assert!(n > 0, "stream ended early");
            seen.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    assert!(find(&seen, b"\"die\"").is_none());
    let _ = go_tx.send(());
    within("the end of the stream", client.read_to_end(&mut seen))
        .await
        .expect("read");
    let text = String::from_utf8_lossy(&seen);
    assert!(text.contains("{\"status\":\"die\",\"id\":\"a\"}"), "{text}");
    assert!(text.ends_with("0\r\n\r\n"), "{text}");
}

/// dockerd's side of an attach: a 101 (or a bare-LF 200 for the raw path), some output, then
/// an echo of stdin until it ends, then a last line and close.
async fn attach_script(
    mut s: UnixStream,
    reply_head: &'static [u8],
    seen_tx: mpsc::UnboundedSender<String>,
) {
    // What came with the head (Content-Length 0) is already stdin.
    let (head, mut stdin) = read_request(&mut s).await;
    let _ = seen_tx.send(head);
    let _ = s.write_all(reply_head).await;
    let _ = s.write_all(b"early\n").await;
    let _ = s.read_to_end(&mut stdin).await;
    let _ = s.write_all(b"got:").await;
    let _ = s.write_all(&stdin).await;
    let _ = s.write_all(b"\nbye\n").await;
}

#[tokio::test]
async fn upgrade_round_trip_with_half_close() {
    let h = Harness::start().await;
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let _dockerd = h.dockerd(move |s| {
        attach_script(
            s,
            b"HTTP/1.1 101 UPGRADED\r\nContent-Type: application/vnd.docker.raw-stream\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n",
            seen_tx.clone(),
        )
    });
    let mut client = h.connect().await;
    client
        .write_all(b"POST /v1.41/containers/c1/attach?stream=1&stdin=1&stdout=1 HTTP/1.1\r\nHost: docker\r\nConnection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: 0\r\n\r\n")
        .await
        .expect("send");
    let (head, mut output) = within("the 101", read_head(&mut client)).await;
    assert!(head.starts_with("HTTP/1.1 101 UPGRADED\r\n"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(
        lower.contains("content-type: application/vnd.docker.raw-stream\r\n"),
        "{head}"
    );
    assert!(lower.contains("upgrade: tcp\r\n"), "{head}");
    let request = within("dockerd to see the request", seen.recv())
        .await
        .expect("request");
    assert!(request.contains("Upgrade: tcp\r\n"), "{request}");
    client.write_all(b"hello").await.expect("stdin");
    // Closing stdin must reach dockerd while its output keeps coming back.
    client.shutdown().await.expect("half-close");
    within("the rest of the stream", client.read_to_end(&mut output))
        .await
        .expect("read");
    assert_eq!(String::from_utf8_lossy(&output), "early\ngot:hello\nbye\n");
}

#[tokio::test]
async fn raw_hijack_without_upgrade_header() {
    let h = Harness::start().await;
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    // dockerd's Go code and the Go proxy wrote bare LFs; the client must get CRLFs.
    let _dockerd = h.dockerd(move |s| {
        attach_script(
            s,
            b"HTTP/1.1 200 OK\nContent-Type: application/vnd.docker.raw-stream\n\n",
            seen_tx.clone(),
        )
    });
    let mut client = h.connect().await;
    // docker-py 1.x: no Upgrade, keep-alive, the socket path as Host; stdin data right away.
    client
        .write_all(b"POST /v1.21/containers/c1/attach?stdin=1&stdout=1&stream=1 HTTP/1.1\r\nHost: /var/run/docker.sock\r\nConnection: keep-alive\r\nAccept: */*\r\nUser-Agent: docker-py/1.10.6\r\nContent-Length: 0\r\n\r\nhel")
        .await
        .expect("send");
    let (head, mut output) = within("the 200", read_head(&mut client)).await;
    assert_eq!(
        head,
        "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.docker.raw-stream\r\n\r\n"
    );
    let request = within("dockerd to see the request", seen.recv())
        .await
        .expect("request");
    assert!(
        request
            .starts_with("POST /v1.21/containers/c1/attach?stdin=1&stdout=1&stream=1 HTTP/1.1\r\n"),
        "{request}"
    );
    assert!(request.contains("Host: \r\n"), "{request}");
    assert!(request.contains("Connection: close\r\n"), "{request}");
    assert!(!request.contains("keep-alive"), "{request}");
    client.write_all(b"lo").await.expect("stdin");
    client.shutdown().await.expect("half-close");
    within("the rest of the stream", client.read_to_end(&mut output))
        .await
        .expect("read");
    assert_eq!(String::from_utf8_lossy(&output), "early\ngot:hello\nbye\n");
}

/// dockerd's side of an attach to an exited container with `logs=1`: the head, the output
/// right behind it, and close.
async fn exited_attach_script(mut s: UnixStream, reply_head: &'static [u8]) {
    let _ = read_request(&mut s).await;
    let mut reply = reply_head.to_vec();
    reply.extend_from_slice(b"hello\n");
    let _ = s.write_all(&reply).await;
}

/// Like docker-py: reads the head with one big read, then the stream to its end. Whatever
/// came in that first read past the head is what docker-py loses.
async fn head_then_stream(h: &Harness, request: &[u8]) -> (String, Vec<u8>) {
    let mut client = h.connect().await;
    client.write_all(request).await.expect("send");
    // A slow client: plenty of time for the proxy to relay the output if it does not wait.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut first = vec![0u8; 64 * 1024];
    let n = within("the head", client.read(&mut first))
        .await
        .expect("read head");
    first.truncate(n);
    let mut rest = Vec::new();
    within("the stream", client.read_to_end(&mut rest))
        .await
        .expect("read stream");
    (String::from_utf8_lossy(&first).into_owned(), rest)
}

#[tokio::test]
async fn output_right_behind_the_101_comes_after_the_client_read_the_head() {
    let h = Harness::start().await;
    let _dockerd = h.dockerd(|s| {
        exited_attach_script(
            s,
            b"HTTP/1.1 101 UPGRADED\r\nContent-Type: application/vnd.docker.raw-stream\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n",
        )
    });
    for _ in 0..3 {
        let (first, rest) = head_then_stream(
            &h,
            b"POST /v1.41/containers/c1/attach?logs=1&stdout=1&stderr=1&stream=0 HTTP/1.1\r\nHost: docker\r\nConnection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        assert!(first.starts_with("HTTP/1.1 101 UPGRADED\r\n"), "{first}");
        assert!(
            first.ends_with("\r\n\r\n"),
            "output came with the head: {first:?}"
        );
        assert_eq!(String::from_utf8_lossy(&rest), "hello\n");
    }
    h.stop().await;
}

#[tokio::test]
async fn raw_hijack_output_right_behind_the_head_comes_after_the_client_read_it() {
    let h = Harness::start().await;
    let _dockerd = h.dockerd(|s| {
        exited_attach_script(
            s,
            b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.docker.raw-stream\r\n\r\n",
        )
    });
    let (first, rest) = head_then_stream(
        &h,
        b"POST /v1.21/containers/c1/attach?logs=1&stdout=1&stream=0 HTTP/1.1\r\nHost: docker\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert_eq!(
        first,
        "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.docker.raw-stream\r\n\r\n"
    );
    assert_eq!(String::from_utf8_lossy(&rest), "hello\n");
    h.stop().await;
}

#[tokio::test]
async fn logs_are_not_hijacked() {
    let h = Harness::start().await;
    let _dockerd = h.dockerd(|mut s| async move {
        let _ = read_request(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.docker.multiplexed-stream\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
            .await;
    });
    let reply = h
        .exchange(
            b"GET /v1.45/containers/c1/logs?follow=1&stdout=1 HTTP/1.1\r\nHost: docker\r\n\r\n",
        )
        .await;
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    assert!(reply.ends_with("3\r\nabc\r\n0\r\n\r\n"), "{reply}");
}

#[tokio::test]
async fn dockerd_down_gives_500() {
    let h = Harness::start().await;
    // No fake dockerd at all.
    let reply = h
        .exchange(b"GET /_ping HTTP/1.1\r\nHost: docker\r\n\r\n")
        .await;
    assert!(
        reply.starts_with("HTTP/1.1 500 Internal Server Error\r\n"),
        "{reply}"
    );
    assert!(
        reply.contains("Content-Type: application/json\r\n"),
        "{reply}"
    );
    let message = message_of(&reply);
    assert!(
        message.starts_with("Could not connect to target"),
        "{message}"
    );
    assert!(
        message.contains("Cannot connect to the Docker daemon"),
        "{message}"
    );

    let raw = h
        .exchange(
            b"POST /v1.21/exec/e1/start HTTP/1.1\r\nHost: docker\r\nContent-Length: 2\r\n\r\n{}",
        )
        .await;
    assert!(
        raw.starts_with("HTTP/1.1 500 Internal Server Error\r\n"),
        "{raw}"
    );
    assert!(
        message_of(&raw).starts_with("Could not connect to target"),
        "{raw}"
    );
    h.stop().await;
}

// ---- interceptions --------------------------------------------------------------------------

/// A fake dockerd that records each request and answers `reply`.
fn recording_dockerd(
    h: &Harness,
    reply: &'static [u8],
) -> (FakeDockerd, mpsc::UnboundedReceiver<(String, Vec<u8>)>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let dockerd = h.dockerd(move |mut s| {
        let tx = tx.clone();
        async move {
            let request = read_request(&mut s).await;
            let _ = tx.send(request);
            let _ = s.write_all(reply).await;
        }
    });
    (dockerd, rx)
}

const CREATED: &[u8] =
    b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{\"Id\":\"c0ffee\"}";

#[tokio::test]
async fn malformed_create_is_refused_and_not_forwarded() {
    let h = Harness::start().await;
    let (dockerd, _) = recording_dockerd(&h, CREATED);
    for body in ["{\"Image\":", ""] {
        let request = format!(
            "POST /v1.41/containers/create HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let reply = h.exchange(request.as_bytes()).await;
        assert!(reply.starts_with("HTTP/1.1 500 "), "{reply}");
        assert!(message_of(&reply).contains("EOF"), "{reply}");
    }
    assert_eq!(dockerd.connections(), 0);
}

#[tokio::test]
async fn invalid_weave_cidr_is_a_400_and_not_forwarded() {
    let h = Harness::start().await;
    let (dockerd, _) = recording_dockerd(&h, CREATED);
    let body = json!({"Image": "busybox", "Cmd": ["sh"], "Env": ["WEAVE_CIDR=10.1/8"]});
    let reply = h
        .exchange(&post_json("/v1.41/containers/create", &body))
        .await;
    assert!(reply.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{reply}");
    assert!(message_of(&reply).contains("10.1/8"), "{reply}");
    assert_eq!(dockerd.connections(), 0);
}

#[tokio::test]
async fn missing_image_is_a_404_naming_it() {
    let h = Harness::start().await;
    let (dockerd, _) = recording_dockerd(&h, CREATED);
    let body = json!({"Image": "nothere:1", "Env": ["WEAVE_CIDR=10.2.1.1/24"]});
    let reply = h
        .exchange(&post_json("/v1.41/containers/create", &body))
        .await;
    assert!(reply.starts_with("HTTP/1.1 404 Not Found\r\n"), "{reply}");
    assert_eq!(message_of(&reply), "No such image: nothere:1");
    assert_eq!(dockerd.connections(), 0);
}

#[tokio::test]
async fn create_is_rewritten_with_exact_length() {
    let h = Harness::start().await;
    lock(&h.docker.images).insert(
        "busybox".into(),
        ImageConfig {
            entrypoint: None,
            cmd: Some(vec!["sh".into()]),
        },
    );
    let (_dockerd, mut requests) = recording_dockerd(&h, CREATED);
    let body =
        json!({"Image": "busybox", "Env": ["WEAVE_CIDR=10.2.1.1/24"], "HostConfig": {"Memory": 0}});
    let reply = h
        .exchange(&post_json("/v1.41/containers/create?name=web", &body))
        .await;
    assert!(reply.starts_with("HTTP/1.1 201 Created\r\n"), "{reply}");
    assert_eq!(reply_body(&reply), "{\"Id\":\"c0ffee\"}");
    let (head, sent) = within("the create", requests.recv())
        .await
        .expect("request");
    assert!(
        head.starts_with("POST /v1.41/containers/create?name=web HTTP/1.1\r\n"),
        "{head}"
    );
    let lower = head.to_ascii_lowercase();
    assert!(
        lower.contains(&format!("content-length: {}\r\n", sent.len())),
        "{head}"
    );
    assert!(!lower.contains("transfer-encoding"), "{head}");
    let sent: Value = serde_json::from_slice(&sent).expect("json");
    assert_eq!(sent["Entrypoint"], json!(["/w/w"]));
    assert_eq!(sent["Cmd"], json!(["sh"]));
    assert_eq!(sent["Hostname"], "web");
    assert_eq!(
        sent["HostConfig"]["Binds"],
        json!(["/var/lib/weave/weavewait/w:/w:ro"])
    );
    assert_eq!(sent["HostConfig"]["Dns"], json!(["172.17.0.1"]));
}

#[tokio::test]
async fn left_alone_create_forwards_the_original_bytes() {
    let h = Harness::start().await;
    let (_dockerd, mut requests) = recording_dockerd(&h, CREATED);
    let original = "{\"Image\":\"busybox\",  \"HostConfig\":{\"NetworkMode\":\"host\"},\"N\":1.50}";
    let request = format!(
        "POST /v1.41/containers/create HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{original}",
        original.len()
    );
    let reply = h.exchange(request.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 201 Created\r\n"), "{reply}");
    let (_, sent) = within("the create", requests.recv())
        .await
        .expect("request");
    assert_eq!(String::from_utf8_lossy(&sent), original);
}

fn woven_container(id: &str, pid: i64) -> Value {
    json!({
        "Id": id,
        "Name": "/web",
        "State": {"Running": true, "Pid": pid},
        "Config": {"Entrypoint": ["/w/w", "sh"], "Env": ["PATH=/bin", "WEAVE_CIDR=10.2.1.1/24"], "Hostname": "web"},
        "HostConfig": {"NetworkMode": "default"},
        "Mounts": [{"Source": "/var/lib/weave/weavewait/w", "Destination": "/w", "RW": false}],
    })
}

const NO_CONTENT: &[u8] = b"HTTP/1.1 204 No Content\r\nApi-Version: 1.41\r\n\r\n";

#[tokio::test]
async fn start_attaches_before_replying() {
    let h = Harness::start().await;
    h.docker.add_container(woven_container("c0ffee", 4242));
    let (_dockerd, mut requests) = recording_dockerd(&h, NO_CONTENT);
    let reply = h
        .exchange(b"POST /v1.41/containers/web/start HTTP/1.1\r\nHost: docker\r\nContent-Length: 0\r\n\r\n")
        .await;
    assert!(reply.starts_with("HTTP/1.1 204 No Content\r\n"), "{reply}");
    let (head, _) = within("the start", requests.recv()).await.expect("request");
    assert!(
        head.starts_with("POST /v1.41/containers/web/start HTTP/1.1\r\n"),
        "{head}"
    );
    let attaches = lock(&h.network.attaches).clone();
    assert_eq!(attaches.len(), 1, "attached before the reply: {attaches:?}");
    let (id, req) = &attaches[0];
    assert_eq!(id, "c0ffee");
    assert_eq!(req.pid, 4242);
    assert_eq!(req.addrs.len(), 1);
    assert_eq!(req.addrs[0].to_string(), "10.2.1.1/24");
    assert!(lock(&h.docker.killed).is_empty());
}

#[tokio::test]
async fn failed_attach_kills_the_container_and_fails_the_start() {
    let h = Harness::start().await;
    h.docker.add_container(woven_container("c0ffee", 4242));
    *lock(&h.network.fail_with) =
        Some("bridge \"weave\" not present; did you launch weave?".into());
    let (_dockerd, _requests) = recording_dockerd(&h, NO_CONTENT);
    let reply = h
        .exchange(b"POST /v1.41/containers/c0ffee/start HTTP/1.1\r\nHost: docker\r\nContent-Length: 0\r\n\r\n")
        .await;
    assert!(reply.starts_with("HTTP/1.1 500 "), "{reply}");
    assert!(
        message_of(&reply).contains("did you launch weave?"),
        "{reply}"
    );
    assert_eq!(*lock(&h.docker.killed), vec!["c0ffee".to_string()]);
}

#[tokio::test]
async fn start_of_a_missing_container_is_a_404() {
    let h = Harness::start().await;
    let (dockerd, _requests) = recording_dockerd(&h, NO_CONTENT);
    let reply = h
        .exchange(
            b"POST /containers/nope/start HTTP/1.1\r\nHost: docker\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
    assert!(reply.starts_with("HTTP/1.1 404 Not Found\r\n"), "{reply}");
    assert_eq!(message_of(&reply), "No such container: nope");
    assert_eq!(dockerd.connections(), 0);
}

#[tokio::test]
async fn docker_errors_on_start_pass_through_without_attach() {
    let h = Harness::start().await;
    h.docker.add_container(woven_container("c0ffee", 4242));
    let (_dockerd, _requests) = recording_dockerd(
        &h,
        b"HTTP/1.1 304 Not Modified\r\nApi-Version: 1.41\r\n\r\n",
    );
    let reply = h
        .exchange(b"POST /v1.41/containers/c0ffee/start HTTP/1.1\r\nHost: docker\r\nContent-Length: 0\r\n\r\n")
        .await;
    assert!(
        reply.starts_with("HTTP/1.1 304 Not Modified\r\n"),
        "{reply}"
    );
    assert!(lock(&h.network.attaches).is_empty());
}

#[tokio::test]
async fn exec_into_a_woven_container_waits_for_the_network() {
    let h = Harness::start().await;
    h.docker.add_container(woven_container("c0ffee", 4242));
    let (_dockerd, mut requests) = recording_dockerd(
        &h,
        b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"Id\":\"e1\"}",
    );
    let body = json!({"AttachStdout": true, "Cmd": ["ip", "addr"]});
    let reply = h
        .exchange(&post_json("/v1.41/containers/web/exec", &body))
        .await;
    assert!(reply.starts_with("HTTP/1.1 201 Created\r\n"), "{reply}");
    let (_, sent) = within("the exec", requests.recv()).await.expect("request");
    let sent: Value = serde_json::from_slice(&sent).expect("json");
    assert_eq!(sent["Cmd"], json!(["/w/w", "ip", "addr"]));
}

#[tokio::test]
async fn inspect_shows_the_weave_address_when_asked() {
    let h = Harness::start_with(|c| c.rewrite_inspect = true).await;
    *lock(&h.network.interface) = Some(InterfaceInfo {
        mac: "02:00:00:00:00:01".into(),
        addrs: vec!["10.2.1.1/24".into()],
    });
    let inspect = r#"{"Id":"c0ffee","State":{"Pid":4242},"NetworkSettings":{"IPAddress":""}}"#;
    let chunked = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{inspect}\r\n0\r\n\r\n",
        inspect.len()
    );
    let reply: &'static [u8] = Box::leak(chunked.into_bytes().into_boxed_slice());
    let (_dockerd, _requests) = recording_dockerd(&h, reply);
    let reply = h
        .exchange(b"GET /v1.41/containers/web/json HTTP/1.1\r\nHost: docker\r\n\r\n")
        .await;
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    let lower = reply.to_ascii_lowercase();
    assert!(
        !lower.contains("transfer-encoding"),
        "rewritten reply is not chunked: {reply}"
    );
    let body: Value = serde_json::from_str(reply_body(&reply)).expect("json");
    assert!(lower.contains(&format!("content-length: {}\r\n", reply_body(&reply).len())));
    assert_eq!(body["NetworkSettings"]["IPAddress"], "10.2.1.1");
    assert_eq!(body["NetworkSettings"]["IPPrefixLen"], 24);
    assert_eq!(body["NetworkSettings"]["MacAddress"], "02:00:00:00:00:01");
}

// ---- events ---------------------------------------------------------------------------------

#[tokio::test]
async fn start_events_attach_containers_started_elsewhere() {
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let h = Harness::start_prepared(
        |c| {
            c.no_multicast_route = true;
            c.keep_tx_on = true;
        },
        |docker, _| {
            *lock(&docker.events) = Some(events_rx);
            docker.add_container(woven_container("c0ffee", 4242));
        },
    )
    .await;
    let network = h.network.clone();
    let attached = network.attached.notified();
    tokio::pin!(attached);
    attached.as_mut().enable();
    // Not a start: ignored.
    let event = |action| ContainerEvent {
        id: "c0ffee".into(),
        action,
        time_nano: crate::docker::unix_now_nanos(),
    };
    events_tx.send(event(EventAction::Die)).expect("send event");
    events_tx
        .send(event(EventAction::Start))
        .expect("send event");
    within("the event-driven attach", attached).await;
    let attaches = lock(&h.network.attaches).clone();
    assert_eq!(attaches.len(), 1);
    assert_eq!(attaches[0].0, "c0ffee");
    assert!(attaches[0].1.no_multicast_route && attaches[0].1.keep_tx_on);
    h.stop().await;
}

#[tokio::test]
async fn running_containers_are_reattached_at_startup() {
    let h = Harness::start_prepared(
        |_| {},
        |docker, _| {
            docker.add_container(woven_container("c0ffee", 4242));
            lock(&docker.running).push("c0ffee".into());
        },
    )
    .await;
    within("the start-up attach", async {
        while lock(&h.network.attaches).is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(lock(&h.network.attaches)[0].1.pid, 4242);
}

#[tokio::test]
async fn failed_event_attach_kills_the_process_not_the_container() {
    // A process of our own stands in for the container's init process.
    let mut victim = tokio::process::Command::new("sleep")
        .arg("60")
        .kill_on_drop(true)
        .spawn()
        .expect("spawn sleep");
    let pid = i64::from(victim.id().expect("pid"));
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let h = Harness::start_prepared(
        |_| {},
        |docker, network| {
            *lock(&docker.events) = Some(events_rx);
            docker.add_container(woven_container("c0ffee", pid));
            *lock(&network.fail_with) = Some("no IPAM".into());
        },
    )
    .await;
    events_tx
        .send(ContainerEvent {
            id: "c0ffee".into(),
            action: EventAction::Start,
            time_nano: crate::docker::unix_now_nanos(),
        })
        .expect("send event");
    let status = within("the process to be killed", victim.wait())
        .await
        .expect("wait");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9));
    assert!(
        lock(&h.docker.killed).is_empty(),
        "no docker kill when nobody waits"
    );
    h.stop().await;
}

#[tokio::test]
async fn legacy_start_body_keeps_the_weavewait_bind() {
    let h = Harness::start().await;
    h.docker.add_container(woven_container("c0ffee", 4242));
    let (_dockerd, mut requests) = recording_dockerd(&h, NO_CONTENT);
    // Exact numbers survive the rewrite.
    let body = r#"{"HostConfig":{"NetworkMode":"host","Binds":["/data:/w"]},"Keep":1.50}"#;
    let request = format!(
        "POST /v1.15/containers/c0ffee/start HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let reply = h.exchange(request.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 204 No Content\r\n"), "{reply}");
    let (head, sent) = within("the start", requests.recv()).await.expect("request");
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("content-length: {}\r\n", sent.len())),
        "{head}"
    );
    let sent = String::from_utf8_lossy(&sent);
    assert_eq!(
        sent,
        r#"{"HostConfig":{"NetworkMode":"host","Binds":["/var/lib/weave/weavewait/w-noop:/w:ro"]},"Keep":1.50}"#
    );
}

#[tokio::test]
async fn refused_upgrade_passes_dockers_answer_through() {
    let h = Harness::start().await;
    let (_dockerd, _requests) = recording_dockerd(
        &h,
        b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 39\r\n\r\n{\"message\":\"No such container: nope\"}\n",
    );
    let reply = h
        .exchange(b"POST /v1.41/containers/nope/attach?stream=1 HTTP/1.1\r\nHost: docker\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n")
        .await;
    assert!(reply.starts_with("HTTP/1.1 404 Not Found\r\n"), "{reply}");
    assert_eq!(message_of(&reply), "No such container: nope");
}

#[tokio::test]
async fn exec_into_a_plain_container_is_forwarded_unchanged() {
    let h = Harness::start().await;
    let mut plain = woven_container("beef", 77);
    plain["Config"]["Entrypoint"] = Value::Null;
    plain["Mounts"] = json!([]);
    h.docker.add_container(plain);
    let (_dockerd, mut requests) = recording_dockerd(
        &h,
        b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"Id\":\"e1\"}",
    );
    let original = r#"{"Cmd":["ls"],  "Tty":false}"#;
    let request = format!(
        "POST /containers/beef/exec HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{original}",
        original.len()
    );
    let reply = h.exchange(request.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 201 Created\r\n"), "{reply}");
    let (_, sent) = within("the exec", requests.recv()).await.expect("request");
    assert_eq!(String::from_utf8_lossy(&sent), original);
}

// ---- bad clients ----------------------------------------------------------------------------

#[tokio::test]
async fn a_create_body_cut_short_creates_nothing_and_the_proxy_carries_on() {
    let h = Harness::start().await;
    let (dockerd, _) = recording_dockerd(&h, CREATED);
    // Announces 200 bytes, sends 20, then hangs up.
    let mut client = h.connect().await;
    client
        .write_all(b"POST /v1.41/containers/create HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{\"Image\":\"busybox\",")
        .await
        .expect("send");
    drop(client);
    // The proxy still answers the next client, and nothing reached dockerd.
    let body = json!({"Image": "busybox", "Cmd": ["sh"], "Env": ["WEAVE_CIDR=10.1/8"]});
    let reply = h
        .exchange(&post_json("/v1.41/containers/create", &body))
        .await;
    assert!(reply.starts_with("HTTP/1.1 400 "), "{reply}");
    assert_eq!(dockerd.connections(), 0);
    h.stop().await;
}

#[tokio::test]
async fn a_client_leaving_a_stream_releases_dockerds_connection() {
    let h = Harness::start().await;
    let (closed_tx, mut closed) = mpsc::unbounded_channel();
    let _dockerd = h.dockerd(move |mut s| {
        let closed_tx = closed_tx.clone();
        async move {
            let _ = read_request(&mut s).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n")
                .await;
            // Keep streaming until the proxy drops our connection.
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if s.write_all(b"2\r\n{}\r\n").await.is_err() {
                    let _ = closed_tx.send(());
                    return;
                }
            }
        }
    });
    let mut client = h.connect().await;
    client
        .write_all(b"GET /v1.41/events HTTP/1.1\r\nHost: docker\r\n\r\n")
        .await
        .expect("send");
    let _ = within("the stream to start", read_head(&mut client)).await;
    drop(client);
    within("dockerd's side to be closed", closed.recv())
        .await
        .expect("closed");
    // And the proxy keeps serving.
    let reply = h
        .exchange(&post_json(
            "/v1.41/containers/create",
            &json!({"Image": "x", "Env": ["WEAVE_CIDR=bad"]}),
        ))
        .await;
    assert!(reply.starts_with("HTTP/1.1 400 "), "{reply}");
    h.stop().await;
}

#[tokio::test]
async fn a_kill_after_a_failed_attach_spares_a_process_that_is_no_longer_the_containers() {
    let mut victim = tokio::process::Command::new("sleep")
        .arg("60")
        .kill_on_drop(true)
        .spawn()
        .expect("spawn sleep");
    let pid = i32::try_from(victim.id().expect("pid")).expect("pid fits");
    let docker = Arc::new(FakeDocker::default());
    let proxy = crate::proxy::Proxy {
        upstream: Upstream::Unix(PathBuf::from("/nonexistent/docker.sock")),
        docker: docker.clone(),
        network: Arc::new(FakeNetwork::default()),
        create: create_options(),
        attach: crate::attach::AttachOptions::default(),
        rewrite_inspect: false,
        starts: crate::proxy::StartTracker::default(),
        attach_timeout: PATIENCE,
    };
    // The container has moved on (another process, or none): `pid` is not its process now.
    for now in [i64::from(pid) + 1, 0] {
        docker.add_container(woven_container("c0ffee", now));
        crate::events::kill_container_process(&proxy, "c0ffee", pid).await;
        assert!(
            victim.try_wait().expect("try_wait").is_none(),
            "killed a process that is no longer the container's (container pid {now})"
        );
    }
    // Control: while it is the container's process, it is killed.
    docker.add_container(woven_container("c0ffee", i64::from(pid)));
    crate::events::kill_container_process(&proxy, "c0ffee", pid).await;
    let status = within("the process to be killed", victim.wait())
        .await
        .expect("wait");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9));
    // Reaped: its PID may be anyone's now; the kill opens no pidfd and signals nobody.
    crate::events::kill_container_process(&proxy, "c0ffee", pid).await;
}
