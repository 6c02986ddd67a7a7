#!/usr/bin/env bash
# Installs the Debian packages the build and the end-to-end tests need (run as root).
# With CI set it always runs `apt-get update` and `apt-get install`; otherwise only when a
# package is missing. Services these packages ship (docker, containerd) are NOT started: the
# tests run their own dockerd per simulated host, inside network namespaces.
set -euo pipefail

PACKAGES=(
  docker.io docker-compose         # dockerd + docker CLI 20.10, compose v1
  busybox-static                   # the test image is built from it
  iproute2 iptables util-linux     # ip netns, veth, bridges; nsenter, unshare
  nftables                         # e2e: drop IP fragments at a device's ingress
  iputils-ping ethtool tcpdump iperf3
  curl                             # e2e: raw API requests over TCP and unix sockets
  python3-docker                   # e2e: docker-py, an outside client, through the proxy
  libpcap-dev pkg-config           # the router captures with libpcap
  libc6-dev                        # libc.a: weavewait (/w/w) is linked statically
  bsdutils                         # `script`: a pty for the `docker run -it` test
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$pkg")
  fi
done

if [ -z "${CI:-}" ] && [ "${#missing[@]}" -eq 0 ]; then
  echo "install-deps: all packages present"
  exit 0
fi
echo "install-deps: installing ${PACKAGES[*]} (missing: ${missing[*]:-none})"

# Keep apt from starting services in the root namespace (docker.service, containerd.service).
policy=/usr/sbin/policy-rc.d
created_policy=""
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod +x "$policy"
  created_policy=1
fi
cleanup() { if [ -n "$created_policy" ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
echo "install-deps: done"
