//! The netlink shell against the real kernel (root only; each test in a throw-away netns).

mod common;

use common::{eventually, in_new_netns, link_exists, sh, tx_checksumming, FakeContainer};
use weave_router::addr::Ipv4Cidr;
use weave_router::bridge::{host_veth_name, Bridge, BridgeError};
use weave_router::iptables;

fn cidr(s: &str) -> Ipv4Cidr {
    s.parse().expect("valid cidr")
}

#[test]
fn bridge_attach_detach_expose_destroy() {
    in_new_netns(|| async {
        let mut bridge = Bridge::new("weave").expect("netlink");
        let mac = bridge.ensure(1376).await.expect("create bridge");
        let shown = sh("ip", &["-d", "link", "show", "weave"]);
        assert!(shown.contains("mtu 1376"), "{shown}");
        assert!(shown.contains("bridge"), "{shown}");
        assert!(shown.contains(&mac.to_string()), "{shown}");
        // Idempotent, same identity.
        assert_eq!(bridge.ensure(1376).await.expect("ensure again"), mac);

        // Container A: two addresses, TX offload off on both ends, multicast route.
        let a = FakeContainer::isolated();
        let a_addrs = [cidr("10.32.1.1/24"), cidr("10.32.2.1/24")];
        let resp = bridge
            .attach(a.pid(), &a_addrs, false, false)
            .await
            .expect("attach A");
        assert_eq!(resp.addrs, ["10.32.1.1/24", "10.32.2.1/24"]);
        let addrs = a.run("ip", &["-4", "addr", "show", "dev", "ethwe"]);
        assert!(addrs.contains("inet 10.32.1.1/24"), "{addrs}");
        assert!(addrs.contains("inet 10.32.2.1/24"), "{addrs}");
        let link = a.run("ip", &["link", "show", "dev", "ethwe"]);
        assert!(link.contains(&resp.mac), "{link}");
        assert!(link.contains("mtu 1376"), "{link}");
        let routes = a.run("ip", &["route", "show", "224.0.0.0/4"]);
        assert!(routes.contains("dev ethwe scope link"), "{routes}");
        assert!(!tx_checksumming(&a.run("ethtool", &["-k", "ethwe"])));
        let host_end = host_veth_name(a.pid());
        let shown = sh("ip", &["link", "show", "dev", &host_end]);
        assert!(shown.contains("master weave"), "{shown}");
        assert!(shown.contains("state UP"), "{shown}");
        assert!(!tx_checksumming(&sh("ethtool", &["-k", &host_end])));
        // Per-namespace sysctls landed in the right namespaces.
        let neigh = "/proc/sys/net/ipv4/neigh";
        let solicit = a.run("cat", &[&format!("{neigh}/ethwe/ucast_solicit")]);
        assert_eq!(solicit.trim(), "1");
        let solicit = sh("cat", &[&format!("{neigh}/weave/ucast_solicit")]);
        assert_eq!(solicit.trim(), "1");
        let accept_ra = sh(
            "cat",
            &[&format!("/proc/sys/net/ipv6/conf/{host_end}/accept_ra")],
        );
        assert_eq!(accept_ra.trim(), "0");

        // Re-attach is idempotent and only adds what is missing.
        let again = bridge
            .attach(a.pid(), &[a_addrs[1], cidr("10.32.3.1/24")], false, false)
            .await
            .expect("re-attach A");
        assert_eq!(again.mac, resp.mac);
        assert_eq!(
            again.addrs,
            ["10.32.1.1/24", "10.32.2.1/24", "10.32.3.1/24"]
        );

        // Container B in the same /24, TX offload kept on, no multicast route.
        let b = FakeContainer::isolated();
        let b_resp = bridge
            .attach(b.pid(), &[cidr("10.32.1.2/24")], true, true)
            .await
            .expect("attach B");
        assert_eq!(b_resp.addrs, ["10.32.1.2/24"]);
        assert!(tx_checksumming(&b.run("ethtool", &["-k", "ethwe"])));
        let routes = b.run("ip", &["route", "show", "224.0.0.0/4"]);
        assert!(routes.trim().is_empty(), "{routes}");
        assert!(
            a.try_run("ping", &["-c", "1", "-W", "5", "10.32.1.2"]),
            "A cannot ping B over the bridge"
        );

        // Ports come and go; the bridge keeps its MAC (the peer name).
        assert_eq!(bridge.mac().await.expect("read mac"), Some(mac));

        // `weave ps` views.
        let info = bridge
            .interface(a.pid())
            .await
            .expect("interface A")
            .expect("A has ethwe");
        assert_eq!(info.mac, resp.mac);
        assert_eq!(info.addrs.len(), 3);
        let bare = FakeContainer::isolated();
        assert_eq!(bridge.interface(bare.pid()).await.expect("no ethwe"), None);

        // Expose: the host reaches the containers' subnet through the bridge.
        bridge.expose(cidr("10.32.1.254/24")).await.expect("expose");
        bridge
            .expose(cidr("10.32.1.254/24"))
            .await
            .expect("expose twice");
        let br = bridge
            .bridge_interface()
            .await
            .expect("bridge interface")
            .expect("bridge exists");
        assert_eq!(br.mac, mac.to_string());
        assert_eq!(br.addrs, ["10.32.1.254/24"]);
        sh("ping", &["-c", "1", "-W", "5", "10.32.1.1"]);
        assert!(bridge.hide(cidr("10.32.1.254/24")).await.expect("hide"));
        assert!(!bridge
            .hide(cidr("10.32.1.254/24"))
            .await
            .expect("hide twice"));
        assert_eq!(bridge.bridge_addrs().await.expect("bridge addrs"), vec![]);

        // Refusals.
        let host_netns = FakeContainer::in_our_netns();
        match bridge
            .attach(host_netns.pid(), &a_addrs, false, false)
            .await
        {
            Err(e @ BridgeError::HostNetns { .. }) => {
                assert_eq!(
                    e.to_string(),
                    "Container is running in the host network namespace"
                )
            }
            other => panic!("expected HostNetns, got {other:?}"),
        }
        assert!(matches!(
            bridge.attach(0, &a_addrs, false, false).await,
            Err(BridgeError::InvalidPid(0))
        ));
        let gone = {
            let c = FakeContainer::in_our_netns();
            c.pid()
        };
        assert!(matches!(
            bridge.attach(gone, &a_addrs, false, false).await,
            Err(BridgeError::NoSuchProcess { .. })
        ));

        // Detach one address (matched by IP), then the rest: the veth goes with the last.
        let removed = bridge
            .detach(a.pid(), &[cidr("10.32.2.1/32")])
            .await
            .expect("detach one");
        assert_eq!(removed, [cidr("10.32.2.1/24")]);
        assert!(a.try_run("ip", &["link", "show", "ethwe"]));
        let removed = bridge.detach(a.pid(), &[]).await.expect("detach all");
        assert_eq!(removed, [cidr("10.32.1.1/24"), cidr("10.32.3.1/24")]);
        assert!(!a.try_run("ip", &["link", "show", "ethwe"]));
        eventually("the host end to go", || !link_exists(&host_end));
        assert_eq!(
            bridge.detach(a.pid(), &[]).await.expect("detach again"),
            vec![]
        );

        // A stale host end (container end gone) is replaced on attach.
        bridge
            .attach(a.pid(), &[cidr("10.32.1.1/24")], false, false)
            .await
            .expect("attach A again");
        a.run("ip", &["link", "del", "ethwe"]);
        eventually("the host end to go with its peer", || {
            !link_exists(&host_end)
        });
        bridge
            .attach(a.pid(), &[cidr("10.32.1.1/24")], false, false)
            .await
            .expect("attach A once more");

        // Reset: bridge and veths gone, idempotently.
        let deleted = bridge.destroy().await.expect("destroy");
        assert!(deleted.contains(&"weave".to_string()), "{deleted:?}");
        assert!(deleted.contains(&host_end), "{deleted:?}");
        assert!(!link_exists("weave"));
        assert!(!link_exists(&host_veth_name(b.pid())));
        assert_eq!(
            bridge.destroy().await.expect("destroy again"),
            Vec::<String>::new()
        );
        assert!(matches!(
            bridge.attach(b.pid(), &a_addrs, false, false).await,
            Err(BridgeError::NoBridge { .. })
        ));
    });
}

#[test]
fn existing_non_bridge_is_refused() {
    in_new_netns(|| async {
        sh(
            "ip",
            &[
                "link",
                "add",
                "weave",
                "type",
                "veth",
                "peer",
                "name",
                "weave-peer",
            ],
        );
        let mut bridge = Bridge::new("weave").expect("netlink");
        assert!(matches!(
            bridge.ensure(1376).await,
            Err(BridgeError::NotABridge { .. })
        ));
        assert!(matches!(
            bridge.ensure(10).await,
            Err(BridgeError::InvalidMtu(10))
        ));
    });
}

#[test]
fn iptables_rules_are_idempotent_and_removable() {
    in_new_netns(|| async {
        iptables::ensure_forward_rules("weave")
            .await
            .expect("ensure");
        iptables::ensure_forward_rules("weave")
            .await
            .expect("ensure twice");
        let forward = sh("iptables", &["-S", "FORWARD"]);
        let ours: Vec<&str> = forward.lines().filter(|l| l.contains("weave")).collect();
        assert_eq!(
            ours,
            [
                // Weave's: containers on docker0 never reach weave's.
                "-A FORWARD -i docker0 -o weave -j DROP",
                "-A FORWARD -i weave -o weave -j ACCEPT",
                "-A FORWARD -o weave -j WEAVE-EXPOSE",
                "-A FORWARD -i weave ! -o weave -j ACCEPT",
                "-A FORWARD -o weave -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            ]
        );

        let c = cidr("10.32.1.254/24");
        iptables::expose_rules("weave", c, false)
            .await
            .expect("expose");
        iptables::expose_rules("weave", c, false)
            .await
            .expect("expose twice");
        let expose = sh("iptables", &["-S", "WEAVE-EXPOSE"]);
        assert_eq!(
            expose
                .lines()
                .filter(|l| l.starts_with("-A"))
                .collect::<Vec<_>>(),
            ["-A WEAVE-EXPOSE -d 10.32.1.0/24 -j ACCEPT"]
        );
        let nat = sh("iptables", &["-t", "nat", "-S"]);
        for want in [
            "-A POSTROUTING -j WEAVE",
            "-A WEAVE -s 10.32.1.0/24 -d 224.0.0.0/4 -j RETURN",
            "-A WEAVE ! -s 10.32.1.0/24 -d 10.32.1.0/24 -j MASQUERADE",
            "-A WEAVE -s 10.32.1.0/24 ! -d 10.32.1.0/24 -j MASQUERADE",
        ] {
            assert_eq!(
                nat.lines().filter(|l| *l == want).count(),
                1,
                "{want} in\n{nat}"
            );
        }

        iptables::hide_rules(c).await.expect("hide");
        iptables::hide_rules(c).await.expect("hide twice");
        assert!(!sh("iptables", &["-S", "WEAVE-EXPOSE"]).contains("10.32.1.0"));
        assert!(!sh("iptables", &["-t", "nat", "-S", "WEAVE"]).contains("10.32.1.0"));

        iptables::remove_all("weave").await.expect("remove all");
        iptables::remove_all("weave")
            .await
            .expect("remove all twice");
        assert!(!sh("iptables", &["-S"]).contains("weave"));
        assert!(!sh("iptables", &["-S"]).contains("WEAVE"));
        assert!(!sh("iptables", &["-t", "nat", "-S"]).contains("WEAVE"));
    });
}
