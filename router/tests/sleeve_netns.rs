//! The sleeve data plane against the real kernel (root only): two simulated routers, each in a
//! throw-away network namespace (held by a `sleep` process, entered by a dedicated thread with
//! `setns`), joined by a veth pair 192.0.2.1/24 ↔ 192.0.2.2/24. Each has the `weave` bridge, its
//! capture port and one fake container; the data planes are fed by hand (no mesh).

mod common;

use std::fs::File;
use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use common::{eventually, sh, FakeContainer};
use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::{mpsc, oneshot, watch};
use weave_router::addr::Ipv4Cidr;
use weave_router::bridge::Bridge;
use weave_router::sleeve::codec::VERSION;
use weave_router::sleeve::{DropReason, PeerName, SessionKeys};
use weave_router::sleeve_shell::{
    run_data_plane, DataPlaneCommand, DataPlaneConfig, DataPlaneError, DataPlaneStatus, RouteTable,
};

const NAME_A: PeerName = PeerName::from_u64(0x0a00_0000_0001);
const NAME_B: PeerName = PeerName::from_u64(0x0b00_0000_0002);
const CONN_UID: u64 = 0x5eed_cafe;
/// The ICMP payload pattern looked for on the wire.
const PATTERN: [u8; 8] = [0xa5, 0xc3, 0xe1, 0xf7, 0xb9, 0xd2, 0x0c, 0x4e];
const PATTERN_HEX: &str = "a5c3e1f7b9d20c4e";

/// Run a command in the network namespace of `pid`; stdout, panics on failure.
fn ns_sh(pid: i32, program: &str, args: &[&str]) -> String {
    let ns = format!("--net=/proc/{pid}/ns/net");
    let mut all = vec![ns.as_str(), program];
    all.extend_from_slice(args);
    sh("nsenter", &all)
}

/// Run `f` on a thread that first enters the network namespace of `pid`.
fn in_netns_of<T: Send + 'static>(pid: i32, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        let ns = File::open(format!("/proc/{pid}/ns/net")).expect("open netns");
        setns(ns, CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

struct Router {
    name: PeerName,
    /// Holds the router's network namespace.
    ns: FakeContainer,
    container: FakeContainer,
    commands: mpsc::Sender<DataPlaneCommand>,
    status: watch::Receiver<DataPlaneStatus>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), DataPlaneError>>>,
}

impl Router {
    /// Bridge, capture port, one container with `ip`, and the data plane, inside `ns`.
    fn start(ns: FakeContainer, me: PeerName, ip: &str) -> Self {
        let container = FakeContainer::isolated();
        let (commands, commands_rx) = mpsc::channel(16);
        let (status_tx, status) = watch::channel(DataPlaneStatus::default());
        let (stop, stop_rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let ns_pid = ns.pid();
        let container_pid = container.pid();
        let cidr: Ipv4Cidr = ip.parse().expect("cidr");
        let thread = std::thread::spawn(move || {
            let file = File::open(format!("/proc/{ns_pid}/ns/net")).expect("open netns");
            setns(file, CloneFlags::CLONE_NEWNET).expect("setns");
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            runtime.block_on(async move {
                let mut bridge = Bridge::new("weave").expect("netlink");
                bridge.ensure(1376).await.expect("create bridge");
                bridge.ensure_capture_port().await.expect("capture port");
                bridge
                    .attach(container_pid, &[cidr], false, false)
                    .await
                    .expect("attach container");
                let config = DataPlaneConfig::new(me, "0.0.0.0:6783".parse().expect("addr"));
                let _ = ready_tx.send(());
                run_data_plane(config, commands_rx, status_tx, async {
                    let _ = stop_rx.await;
                })
                .await
            })
        });
        ready_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("router set up");
        Router {
            name: me,
            ns,
            container,
            commands,
            status,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn send(&self, cmd: DataPlaneCommand) {
        self.commands.blocking_send(cmd).expect("data plane alive");
    }

    fn peer_established(&self, peer: PeerName) -> bool {
        self.status
            .borrow()
            .peers
            .get(&peer)
            .is_some_and(|p| p.established)
    }

    fn stop(&mut self) -> Result<(), DataPlaneError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take() {
            Some(t) => t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
            None => Ok(()),
        }
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        if self.thread.is_some() && !std::thread::panicking() {
            let _ = self.stop();
        } else if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn routes(me: PeerName, other: PeerName) -> RouteTable {
    let mut r = RouteTable::default();
    r.unicast.insert(other, other);
    r.broadcast.insert(me, vec![other]);
    r.broadcast.insert(other, vec![]);
    r
}

/// Two routers joined by a veth pair, connected (A dials B; B learns A's address), both
/// established.
fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A veth pair `dev_x` (in `x`'s netns, address `addr_x`) ↔ `dev_y` (in `y`'s).
fn link(x: &FakeContainer, y: &FakeContainer, ends: [(&str, &str); 2]) {
    let [(dev_x, addr_x), (dev_y, addr_y)] = ends;
    let y_ns = format!("/proc/{}/ns/net", y.pid());
    ns_sh(
        x.pid(),
        "ip",
        &[
            "link", "add", dev_x, "type", "veth", "peer", "name", dev_y, "netns", &y_ns,
        ],
    );
    for (pid, dev, addr) in [(x.pid(), dev_x, addr_x), (y.pid(), dev_y, addr_y)] {
        ns_sh(pid, "ip", &["link", "set", "lo", "up"]);
        ns_sh(pid, "ip", &["addr", "add", addr, "dev", dev]);
        ns_sh(pid, "ip", &["link", "set", dev, "up"]);
    }
}

/// Connect `x` (dialler, knows `y`'s address) and `y` (encrypted: learns `x`'s address from
/// heartbeats; plaintext: is given it, as the router does); wait for both to be established.
fn connect(x: (&Router, &str), y: (&Router, &str), encrypted: bool) {
    let ((x, x_addr), (y, y_addr)) = (x, y);
    let (keys_x, keys_y) = if encrypted {
        let (k1, k2) = ([0x11; 32], [0x22; 32]);
        (
            Some(SessionKeys {
                epoch: 0,
                send: k1,
                recv: k2,
            }),
            Some(SessionKeys {
                epoch: 0,
                send: k2,
                recv: k1,
            }),
        )
    } else {
        (None, None)
    };
    y.send(DataPlaneCommand::PeerUp {
        name: x.name,
        conn_uid: CONN_UID,
        // Plaintext: the listener is given the dialler's address too (the only check on it).
        remote: (!encrypted).then(|| x_addr.parse().expect("addr")),
        udp_keys: keys_y,
    });
    x.send(DataPlaneCommand::PeerUp {
        name: y.name,
        conn_uid: CONN_UID,
        remote: Some(y_addr.parse().expect("addr")),
        udp_keys: keys_x,
    });
    eventually("both forwarders to be established", || {
        x.peer_established(y.name) && y.peer_established(x.name)
    });
}

/// Two routers joined by a veth pair, connected (A dials B; B learns A's address), both
/// established.
fn pair(encrypted: bool) -> (Router, Router) {
    init_tracing();
    let ns_a = FakeContainer::isolated();
    let ns_b = FakeContainer::isolated();
    link(
        &ns_a,
        &ns_b,
        [("va", "192.0.2.1/24"), ("vb", "192.0.2.2/24")],
    );
    let a = Router::start(ns_a, NAME_A, "10.35.1.1/24");
    let b = Router::start(ns_b, NAME_B, "10.35.1.2/24");
    a.send(DataPlaneCommand::Routes(routes(NAME_A, NAME_B)));
    b.send(DataPlaneCommand::Routes(routes(NAME_B, NAME_A)));
    connect((&a, "192.0.2.1:6783"), (&b, "192.0.2.2:6783"), encrypted);
    // PMTU discovery over the 1500-byte veth (probing from 65535 down: the kernel's EMSGSIZE
    // gives the path MTU): 1472-byte UDP payloads, so 1416 plain / 1400 encrypted.
    let expected = if encrypted { 1400 } else { 1416 };
    for (r, peer) in [(&a, NAME_B), (&b, NAME_A)] {
        eventually("PMTU verified", || {
            r.status
                .borrow()
                .peers
                .get(&peer)
                .is_some_and(|p| p.pmtu_verified && p.mtu == expected)
        });
    }
    (a, b)
}

/// A line A — M — B: A and B have no connection, M relays (unicast and broadcast).
#[test]
fn relay_through_a_middle_router() {
    init_tracing();
    let name_m = PeerName::from_u64(0x0c00_0000_0003);
    let ns_a = FakeContainer::isolated();
    let ns_m = FakeContainer::isolated();
    let ns_b = FakeContainer::isolated();
    link(
        &ns_a,
        &ns_m,
        [("va", "192.0.2.1/24"), ("vm", "192.0.2.3/24")],
    );
    link(
        &ns_m,
        &ns_b,
        [("wm", "198.51.100.3/24"), ("wb", "198.51.100.2/24")],
    );
    let a = Router::start(ns_a, NAME_A, "10.35.1.1/24");
    let m = Router::start(ns_m, name_m, "10.35.1.3/24");
    let b = Router::start(ns_b, NAME_B, "10.35.1.2/24");
    let table = |unicast: &[(PeerName, PeerName)], broadcast: &[(PeerName, &[PeerName])]| {
        let mut r = RouteTable::default();
        r.unicast.extend(unicast.iter().copied());
        r.broadcast
            .extend(broadcast.iter().map(|(s, hops)| (*s, hops.to_vec())));
        DataPlaneCommand::Routes(r)
    };
    a.send(table(
        &[(name_m, name_m), (NAME_B, name_m)],
        &[(NAME_A, &[name_m]), (name_m, &[]), (NAME_B, &[])],
    ));
    m.send(table(
        &[(NAME_A, NAME_A), (NAME_B, NAME_B)],
        &[
            (name_m, &[NAME_A, NAME_B]),
            (NAME_A, &[NAME_B]),
            (NAME_B, &[NAME_A]),
        ],
    ));
    b.send(table(
        &[(name_m, name_m), (NAME_A, name_m)],
        &[(NAME_B, &[name_m]), (name_m, &[]), (NAME_A, &[])],
    ));
    connect((&a, "192.0.2.1:6783"), (&m, "192.0.2.3:6783"), true);
    connect((&b, "198.51.100.2:6783"), (&m, "198.51.100.3:6783"), false);
    // A's ARP broadcast is flooded by M to B; B's reply and the echo are relayed by M.
    assert!(ping(&a.container, &[]), "ping A → B through M");
    assert!(
        ping(&a.container, &["-s", "1300", "-M", "do"]),
        "large ping"
    );
    // M's own container is reachable too (it received the broadcast and injected it).
    assert!(a
        .container
        .try_run("ping", &["-c", "1", "-W", "5", "10.35.1.3"]));
    // Counters are published about once a second.
    eventually("M to count frames relayed to B", || {
        m.status
            .borrow()
            .peers
            .get(&NAME_B)
            .is_some_and(|p| p.stats.frames_sent >= 3)
    });
}

fn ping(from: &FakeContainer, extra: &[&str]) -> bool {
    let mut args = vec!["-c", "1", "-W", "5"];
    args.extend_from_slice(extra);
    args.push("10.35.1.2");
    from.try_run("ping", &args)
}

/// Capture UDP on `dev` in `pid`'s netns while `during` runs; the raw pcap file bytes.
fn tcpdump_during(pid: i32, dev: &str, during: impl FnOnce()) -> Vec<u8> {
    let path = std::env::temp_dir().join(format!("sleeve-netns-{}-{pid}.pcap", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let path_str = path.to_string_lossy().into_owned();
    let mut child = Command::new("nsenter")
        .args([
            &format!("--net=/proc/{pid}/ns/net"),
            "tcpdump",
            "-i",
            dev,
            "-U",
            "--immediate-mode",
            "-s",
            "0",
            "-w",
            &path_str,
            "udp",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn tcpdump");
    eventually("tcpdump to start", || {
        std::fs::metadata(&path).is_ok_and(|m| m.len() >= 24)
    });
    during();
    // The echo request and reply went out: wait until tcpdump has written them.
    eventually("tcpdump to write the ping", || {
        std::fs::metadata(&path).is_ok_and(|m| m.len() >= 24 + 2 * 200)
    });
    let tcpdump = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    let _ = kill(tcpdump, Signal::SIGINT);
    let _ = child.wait();
    let bytes = std::fs::read(&path).expect("read capture");
    let _ = std::fs::remove_file(&path);
    bytes
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn check_pings(a: &Router, b: &Router) {
    // ARP broadcast flooded to B, reply unicast back, then the echo.
    assert!(ping(&a.container, &[]), "ping A → B");
    assert!(
        ping(&a.container, &["-s", "1300", "-M", "do"]),
        "ping -s 1300"
    );
    // Fragmented by the container (bridge MTU 1376); every fragment fits the overlay.
    assert!(ping(&a.container, &["-s", "8000"]), "ping -s 8000");
    // Counters are published about once a second.
    eventually("B to count injected frames", || {
        b.status.borrow().injected_frames > 0
    });
}

#[test]
fn plaintext_ping_large_frames_and_garbage() {
    let (mut a, mut b) = pair(false);
    check_pings(&a, &b);
    {
        let status = a.status.borrow();
        let peer = status.peers.get(&NAME_B).expect("peer B");
        assert!(!peer.encrypted);
        assert_eq!(peer.remote, Some("192.0.2.2:6783".parse().expect("addr")));
    }
    // B was given A's address (plaintext: the only check on who sends).
    assert_eq!(
        b.status.borrow().peers.get(&NAME_A).and_then(|p| p.remote),
        Some("192.0.2.1:6783".parse().expect("addr"))
    );

    // Sanity check for the encrypted test: in plaintext the payload is visible on the wire.
    let wire = tcpdump_during(a.ns.pid(), "va", || {
        assert!(ping(&a.container, &["-p", PATTERN_HEX, "-s", "200"]));
    });
    assert!(contains(&wire, &PATTERN), "plaintext payload not seen");

    // Garbage to port 6783: dropped and counted, never fatal.
    let before = b.status.borrow().drops.clone();
    in_netns_of(a.ns.pid(), || {
        let s = UdpSocket::bind("192.0.2.1:0").expect("bind");
        let to = "192.0.2.2:6783";
        for junk in [
            &b""[..],
            &b"x"[..],
            &[0xff; 100][..],
            &[1, 0, 0, 0][..],
            &[1; 28][..],
            &[9; 2000][..],
        ] {
            s.send_to(junk, to).expect("send garbage");
        }
        // A well-formed header from a peer B has no forwarder for.
        let mut unknown = vec![VERSION, 0, 0, 0];
        unknown.extend_from_slice(&[0x0c, 0, 0, 0, 0, 3]);
        unknown.extend_from_slice(&NAME_B.to_bytes());
        unknown.extend_from_slice(&[0; 12]);
        unknown.extend_from_slice(&[0; 20]);
        s.send_to(&unknown, to).expect("send unknown sender");
        // Well-formed, naming A, with a bad frame record, but not from A's address (this
        // socket's port is not 6783): plaintext, so dropped as from the wrong address.
        let mut bad = vec![VERSION, 0, 0, 0];
        bad.extend_from_slice(&NAME_A.to_bytes());
        bad.extend_from_slice(&NAME_B.to_bytes());
        bad.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        bad.extend_from_slice(&[0; 14]);
        bad.extend_from_slice(&[0xff; 3]);
        s.send_to(&bad, to).expect("send bad frames");
    });
    eventually("garbage to be counted", || {
        let d = b.status.borrow().drops.clone();
        d.bad_header_total() >= before.bad_header_total() + 4
            && d.unknown_sender > before.unknown_sender
    });
    eventually("the datagram from the wrong address to be counted", || {
        b.status
            .borrow()
            .peers
            .get(&NAME_A)
            .is_some_and(|p| p.drops.get(DropReason::WrongAddress) > 0)
    });
    // Still working.
    assert!(ping(&a.container, &[]), "ping after garbage");

    if std::env::var_os("SLEEVE_IPERF").is_some() {
        iperf(&a, &b);
        println!("{:#?}", a.status.borrow());
    }
    a.stop().expect("A stopped cleanly");
    b.stop().expect("B stopped cleanly");
}

#[test]
fn encrypted_ping_hides_payload() {
    let (mut a, mut b) = pair(true);
    assert!(a
        .status
        .borrow()
        .peers
        .get(&NAME_B)
        .is_some_and(|p| p.encrypted));
    check_pings(&a, &b);
    let wire = tcpdump_during(a.ns.pid(), "va", || {
        assert!(ping(&a.container, &["-p", PATTERN_HEX, "-s", "200"]));
    });
    assert!(wire.len() > 24 + 200, "nothing captured on the wire");
    assert!(
        !contains(&wire, &PATTERN),
        "ICMP payload visible in plaintext"
    );
    if std::env::var_os("SLEEVE_IPERF").is_some() {
        iperf(&a, &b);
        println!("{:#?}", a.status.borrow());
    }
    a.stop().expect("A stopped cleanly");
    b.stop().expect("B stopped cleanly");
}

/// Throughput between the fake containers (only with `SLEEVE_IPERF` set): printed, not checked.
fn iperf(a: &Router, b: &Router) {
    let server = Command::new("nsenter")
        .args([
            &format!("--net=/proc/{}/ns/net", b.container.pid()),
            "iperf3",
            "-s",
            "-1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut server) = server else {
        return;
    };
    std::thread::sleep(Duration::from_millis(500));
    let out = a.container.run("iperf3", &["-c", "10.35.1.2", "-t", "3"]);
    println!("{out}");
    let _ = server.wait();
}
