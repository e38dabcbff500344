#!/usr/bin/env bash
# The page's DOM-free modules are unit-tested with Node's built-in test runner (node --test).
set -euo pipefail
if command -v node >/dev/null; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "Installing Debian's nodejs for the page's unit tests..."
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs >/dev/null
else
  echo "node is missing: install Node.js 18 or newer (sudo apt-get install nodejs) to run the page's unit tests." >&2
  exit 1
fi
