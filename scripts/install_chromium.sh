#!/usr/bin/env bash
# Chromium and its WebDriver for the browser tests (make test-browser): Debian's chromium and
# chromium-driver packages, installed with apt-get (as root, or with sudo) when /usr/bin/chromium or
# /usr/bin/chromedriver is missing. CHROMIUM and CHROMEDRIVER name other binaries (nothing is installed).
set -euo pipefail

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
CHROMEDRIVER="${CHROMEDRIVER:-/usr/bin/chromedriver}"
if [[ -x "$CHROMIUM" && -x "$CHROMEDRIVER" ]]; then
  echo "[chromium] $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM"), $("$CHROMEDRIVER" --version | cut -d' ' -f1-2)"
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "[chromium] $CHROMIUM or $CHROMEDRIVER is missing and there is no apt-get: install Chromium and its" \
    "chromedriver, and set CHROMIUM and CHROMEDRIVER to them" >&2
  exit 1
fi
SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then
  SUDO=(sudo)
fi
echo "[chromium] installing Debian's chromium and chromium-driver with apt-get"
"${SUDO[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq chromium chromium-driver
"$CHROMIUM" --version 2>/dev/null || true
