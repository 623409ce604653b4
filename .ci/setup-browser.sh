#!/usr/bin/env bash
# Make sure the browser test (tests/test_browser.py) has Debian's Chromium.
# Idempotent: does nothing when /usr/bin/chromium is already there. Playwright's
# own browser downloads are never used; the Python side (playwright,
# jupyterlab, ipywidgets) comes from pip install -e ".[all]" (the browser extra).
set -euo pipefail

CHROMIUM="${MPMAGIC_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
    echo "setup-browser: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM") already installed"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup-browser: no apt-get here; install Chromium yourself and set MPMAGIC_CHROMIUM to its path" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "setup-browser: installing chromium needs root (or sudo)" >&2
        exit 1
    fi
fi

echo "setup-browser: installing Debian's chromium package"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q chromium
"$CHROMIUM" --version
