#!/usr/bin/env bash
# Installs Debian's chromium + chromedriver for the console's browser tests, when missing
# and apt-get can be used (root, or password-less sudo). Never fails the caller's install:
# without them tests/service/test_console_browser.py skips with the reason.
set -uo pipefail
if command -v chromedriver >/dev/null 2>&1 && { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; }; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_chromium: no apt-get here; the browser tests will be skipped" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "install_chromium: not root and no password-less sudo; the browser tests will be skipped" >&2
    exit 1
  fi
fi
echo "install_chromium: installing chromium and chromium-driver with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-liberation >/dev/null 2>&1; then
  # The package lists may be missing or stale on a fresh machine.
  $SUDO apt-get update -qq >/dev/null 2>&1 || true
  if ! $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-liberation >/dev/null; then
    echo "install_chromium: apt-get could not install chromium; the browser tests will be skipped" >&2
    exit 1
  fi
fi
