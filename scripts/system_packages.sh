#!/usr/bin/env bash
# Debian packages the tests drive: headless Chromium and its driver (admin pages), promtool
# (prometheus.yml), curl for scripts/test_api.sh, nginx (tests/test_proxy.py), perf
# (bench/syscalls.py, which a test starts), and, as root on a
# machine without a Docker engine, Debian's docker.io and debootstrap for scripts/test_image.sh.
# Installed only when missing; needs root (or sudo) the first time.
set -euo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v curl >/dev/null 2>&1 || missing+=(curl)
PATH="$PATH:/usr/sbin:/sbin" command -v nginx >/dev/null 2>&1 || missing+=(nginx-light)
command -v perf >/dev/null 2>&1 || missing+=(linux-perf)
if [ "$(id -u)" -eq 0 ] && ! docker info >/dev/null 2>&1; then
    PATH="$PATH:/usr/sbin" command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
    PATH="$PATH:/usr/sbin" command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
fi
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# --no-install-recommends keeps prometheus from pulling a web UI and exporters we don't use.
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
