#!/usr/bin/env bash
# Installs the Debian packages that the tests use as real peers: Prometheus (with promtool), which
# scrapes a running server and evaluates the dashboard's and the alert rules' queries
# (docs/observability.md), and Chromium, the browser that drives the consult page (--ui).
# Idempotent: returns at once when every command is there. Needs root (or sudo) the first time.
set -euo pipefail
need=()
command -v prometheus >/dev/null || need+=(prometheus)
command -v promtool >/dev/null || need+=(prometheus)
command -v chromium >/dev/null || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0
mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
SUDO=
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || {
    echo "setup-system: install the Debian packages ${need[*]} (as root: apt-get install ${need[*]})" >&2
    exit 1
  }
  SUDO=sudo
fi
# No service is started: the tests start their own Prometheus on loopback.
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "setup-system: ${need[*]} installed"
