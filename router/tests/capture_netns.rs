//! The sleeve capture shell against the real kernel (root only; each test in a throw-away
//! netns): the bridge's capture pair, pcap capture (inbound only) and injection.

mod common;

use std::net::{Ipv4Addr, UdpSocket};
use std::time::Duration;

use bytes::Bytes;
use common::{eventually, in_new_netns, link_exists, sh, tx_checksumming, FakeContainer};
use weave_router::addr::Ipv4Cidr;
use weave_router::bridge::{Bridge, CAPTURE_IFNAME, CAPTURE_PORT_IFNAME};
use weave_router::capture::{Capture, CaptureConfig, CaptureError, CaptureRx};

const ETH_P_ARP: [u8; 2] = [0x08, 0x06];
const ETH_P_IP: [u8; 2] = [0x08, 0x00];
const BROADCAST: [u8; 6] = [0xff; 6];
/// A MAC no container has: the "remote" sender of injected frames.
const FAKE_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x99];
/// An address no local container has.
const ABSENT: Ipv4Addr = Ipv4Addr::new(10, 35, 1, 99);
/// How long to wait for an expected frame.
const PATIENCE: Duration = Duration::from_secs(10);

fn cidr(s: &str) -> Ipv4Cidr {
    s.parse().expect("valid cidr")
}

fn parse_mac(s: &str) -> [u8; 6] {
    let mut mac = [0u8; 6];
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16).expect("hex MAC"))
        .collect();
    mac.copy_from_slice(&parts);
    mac
}

/// The fields of an ARP frame the test looks at.
#[derive(Debug, PartialEq, Eq)]
struct Arp {
    dst: [u8; 6],
    op: u16,
    sha: [u8; 6],
    spa: Ipv4Addr,
    tpa: Ipv4Addr,
}

fn arp(frame: &[u8]) -> Option<Arp> {
    if frame.len() < 42 || frame[12..14] != ETH_P_ARP {
        return None;
    }
    let mac = |r: std::ops::Range<usize>| <[u8; 6]>::try_from(&frame[r]).ok();
    let ip = |at: usize| Ipv4Addr::new(frame[at], frame[at + 1], frame[at + 2], frame[at + 3]);
    Some(Arp {
        dst: mac(0..6)?,
        op: u16::from_be_bytes([frame[20], frame[21]]),
        sha: mac(22..28)?,
        spa: ip(28),
        tpa: ip(38),
    })
}

/// A broadcast ARP request "who has `target`? tell `sender_ip` at `sender_mac`".
fn arp_request(sender_mac: [u8; 6], sender_ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&BROADCAST);
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&ETH_P_ARP);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&sender_ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

/// Receive until a frame satisfies `want`; every frame seen (including that one) is returned.
async fn wait_for(rx: &mut CaptureRx, what: &str, want: impl Fn(&[u8]) -> bool) -> Vec<Bytes> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(frame)) => {
                let found = want(&frame);
                seen.push(frame);
                if found {
                    return seen;
                }
            }
            Ok(None) => panic!("capture ended while waiting for {what}"),
            Err(_) => panic!("timed out waiting for {what}; saw {} frames", seen.len()),
        }
    }
}

/// One's-complement sum of 16-bit words.
fn sum16(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Is this an IPv4/UDP frame to `port` whose UDP checksum verifies (and is not zero)?
fn udp_checksum_ok(frame: &[u8], port: u16) -> Option<bool> {
    if frame.len() < 14 + 20 + 8 || frame[12..14] != ETH_P_IP || frame[14 + 9] != 17 {
        return None;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let ip = &frame[14..];
    let udp = ip.get(ihl..)?;
    if udp.len() < 8 || u16::from_be_bytes([udp[2], udp[3]]) != port {
        return None;
    }
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    let udp = udp.get(..udp_len)?;
    if udp[6..8] == [0, 0] {
        return Some(false);
    }
    let mut acc = sum16(&ip[12..20], 0);
    acc += 17 + u32::try_from(udp_len).ok()?;
    Some(fold(sum16(udp, acc)) == 0xffff)
}

#[test]
fn capture_port_capture_and_injection() {
    in_new_netns(|| async {
        let mut bridge = Bridge::new("weave").expect("netlink");
        bridge.ensure(1376).await.expect("create bridge");
        bridge.ensure_capture_port().await.expect("capture port");
        // Idempotent.
        bridge
            .ensure_capture_port()
            .await
            .expect("capture port again");

        // Layout (spec router §5.1–5.2).
        let port = sh("ip", &["-d", "link", "show", CAPTURE_PORT_IFNAME]);
        assert!(port.contains("master weave"), "{port}");
        assert!(port.contains("mtu 1376"), "{port}");
        assert!(port.contains("hairpin off"), "{port}");
        assert!(port.contains(",UP"), "{port}");
        let pcap = sh("ip", &["-d", "link", "show", CAPTURE_IFNAME]);
        assert!(pcap.contains("mtu 1376"), "{pcap}");
        assert!(pcap.contains("veth"), "{pcap}");
        assert!(pcap.contains(",UP"), "{pcap}");
        assert!(!pcap.contains("master"), "{pcap}");
        // (c) TX checksum offload off on the bridge itself, left on for the pair.
        assert!(!tx_checksumming(&sh("ethtool", &["-k", "weave"])));
        assert!(tx_checksumming(&sh("ethtool", &["-k", CAPTURE_IFNAME])));

        let a = FakeContainer::isolated();
        let a_resp = bridge
            .attach(a.pid(), &[cidr("10.35.1.1/24")], false, false)
            .await
            .expect("attach A");
        let a_mac = parse_mac(&a_resp.mac);
        let b = FakeContainer::isolated();
        let b_resp = bridge
            .attach(b.pid(), &[cidr("10.35.1.2/24")], false, false)
            .await
            .expect("attach B");
        let b_mac = parse_mac(&b_resp.mac);

        assert!(matches!(
            Capture::open("no-such-if", CaptureConfig::default()),
            Err(CaptureError::Pcap { .. })
        ));
        let (mut rx, injector) =
            Capture::open(CAPTURE_IFNAME, CaptureConfig::default()).expect("open capture");
        assert_eq!(injector.iface(), CAPTURE_IFNAME);

        // (a) A looks for an address no local container has: its ARP broadcast reaches the
        // capture (the router would send it to the other peers).
        assert!(!a.try_run("ping", &["-c", "1", "-W", "1", &ABSENT.to_string()]));
        wait_for(&mut rx, "A's ARP request for the absent address", |f| {
            arp(f)
                == Some(Arp {
                    dst: BROADCAST,
                    op: 1,
                    sha: a_mac,
                    spa: Ipv4Addr::new(10, 35, 1, 1),
                    tpa: ABSENT,
                })
        })
        .await;

        // (b) A frame "from a remote container", injected into the bridge: B answers it, the
        // answer is captured, and the injected frame itself is not (direction in).
        let request = arp_request(FAKE_MAC, ABSENT, Ipv4Addr::new(10, 35, 1, 2));
        injector.inject(&request, None).expect("inject");
        let seen = wait_for(&mut rx, "B's ARP reply to the injected request", |f| {
            arp(f)
                == Some(Arp {
                    dst: FAKE_MAC,
                    op: 2,
                    sha: b_mac,
                    spa: Ipv4Addr::new(10, 35, 1, 2),
                    tpa: ABSENT,
                })
        })
        .await;
        let mut all = seen;
        while let Some(f) = rx.try_recv() {
            all.push(f);
        }
        assert!(
            all.iter().all(|f| f[6..12] != FAKE_MAC),
            "an injected frame was captured back"
        );
        // Injection works from another thread too (the handle is shared).
        let other = injector.clone();
        std::thread::spawn(move || other.inject(&request, None))
            .join()
            .expect("injecting thread")
            .expect("inject from another thread");

        // Host-originated frames carry complete checksums (TX offload off on the bridge).
        bridge.expose(cidr("10.35.1.254/24")).await.expect("expose");
        let sock = UdpSocket::bind("10.35.1.254:0").expect("bind UDP");
        sock.set_broadcast(true).expect("SO_BROADCAST");
        let payload = vec![0x5a; 1200];
        sock.send_to(&payload, "10.35.1.255:9999")
            .expect("send UDP broadcast");
        let seen = wait_for(&mut rx, "the host's UDP broadcast", |f| {
            udp_checksum_ok(f, 9999).is_some()
        })
        .await;
        let frame = seen.last().expect("at least the UDP frame");
        assert_eq!(frame.len(), 14 + 20 + 8 + 1200);
        assert_eq!(udp_checksum_ok(frame, 9999), Some(true), "partial checksum");

        // Back-pressure: a consumer that does not read gets at most its queue; the rest is
        // dropped and counted.
        let small = CaptureConfig {
            queue: 2,
            ..CaptureConfig::default()
        };
        let (mut slow, _injector) = Capture::open(CAPTURE_IFNAME, small).expect("open slow");
        for _ in 0..20 {
            sock.send_to(&payload, "10.35.1.255:9999")
                .expect("send UDP broadcast");
        }
        eventually("the slow capture to drop frames", || {
            slow.stats().queue_dropped >= 18
        });
        let mut queued = 0;
        while slow.try_recv().is_some() {
            queued += 1;
        }
        assert_eq!(queued, 2);
        slow.close();

        // Statistics from libpcap show up (refreshed about once a second).
        eventually("libpcap statistics", || rx.stats().packets_received > 0);
        let stats = rx.stats();
        assert!(stats.captured >= 3, "{stats:?}");
        assert_eq!(stats.queue_dropped, 0, "{stats:?}");

        // Clean shutdown: the thread exits.
        rx.close();

        // Reset removes the pair.
        let deleted = bridge.destroy().await.expect("destroy");
        assert!(
            deleted.contains(&CAPTURE_PORT_IFNAME.to_string()),
            "{deleted:?}"
        );
        assert!(!link_exists(CAPTURE_PORT_IFNAME));
        assert!(!link_exists(CAPTURE_IFNAME));
    });
}

#[test]
fn capture_ends_when_the_interface_goes() {
    in_new_netns(|| async {
        let mut bridge = Bridge::new("weave").expect("netlink");
        bridge.ensure(65535).await.expect("create bridge");
        bridge.ensure_capture_port().await.expect("capture port");
        let pcap = sh("ip", &["link", "show", CAPTURE_IFNAME]);
        assert!(pcap.contains("mtu 65535"), "{pcap}");
        let (rx, _injector) =
            Capture::open(CAPTURE_IFNAME, CaptureConfig::default()).expect("open capture");
        // Dropping the receiver stops the thread without waiting for traffic.
        drop(rx);
        let (mut rx, _injector) =
            Capture::open(CAPTURE_IFNAME, CaptureConfig::default()).expect("reopen capture");
        bridge.destroy().await.expect("destroy");
        let ended =
            tokio::time::timeout(PATIENCE, async { while rx.recv().await.is_some() {} }).await;
        assert!(ended.is_ok(), "capture did not end with its interface");
    });
}
