#!/usr/bin/env bash
# Installs the Debian packages that tests and benchmarks run for real, only when missing.
set -euo pipefail
need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)  # h2c load in tests/protocols
# Registries the discovery tests start for real (tests/discovery; redis-server too, below).
# dnsmasq-base is the binary without the system service (which would try to take port 53).
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq-base)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
# Go's encoding/json is the reference the FARP checksum tests compare canonical JSON with.
command -v go >/dev/null 2>&1 || [ -x /usr/lib/go/bin/go ] || need+=(golang-go)
# The dashboard's browser tests (tests/dashboard) drive Debian's Chromium through Playwright.
[ -x /usr/bin/chromium ] || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing Debian packages: ${need[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
