#!/usr/bin/env bash
# Headless Chromium and its WebDriver for the explorer page's browser test
# (tests/test_serving.py), from the system's packages. Does nothing when both
# are installed already; uses sudo when not run as root.
set -euo pipefail
if command -v chromedriver >/dev/null && { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; }; then
    exit 0
fi
as_root=()
[ "$(id -u)" -eq 0 ] || as_root=(sudo)
if command -v apt-get >/dev/null; then
    "${as_root[@]}" apt-get update -q
    # Debian names them chromium / chromium-driver, Ubuntu chromium-browser / chromium-chromedriver
    "${as_root[@]}" apt-get install -y -q chromium chromium-driver \
        || "${as_root[@]}" apt-get install -y -q chromium-browser chromium-chromedriver
else
    echo "install Chromium and chromedriver with your system's package manager" >&2
    exit 1
fi
