#!/usr/bin/env bash
# Debian packages the tests drive: headless Chromium and its driver (admin pages) and promtool
# (prometheus.yml), and curl for scripts/test_api.sh. Installed only when missing; needs root
# (or sudo) the first time.
set -euo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v curl >/dev/null 2>&1 || missing+=(curl)
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
