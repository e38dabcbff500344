#!/usr/bin/env bash
# The browser tests drive Debian's Chromium through Playwright; Playwright never downloads one.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "Installing Debian's chromium for the browser tests..."
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-color-emoji >/dev/null
else
  echo "chromium is missing: install it (sudo apt-get install chromium) to run the browser tests." >&2
  exit 1
fi
