#!/usr/bin/env bash
# Debian packages the test suite needs: docker-compose (validates docker-compose.yml without an
# engine), chromium (drives the dashboard and Keen's SDK) and npm (installs that SDK). Installs only
# what is missing.
set -euo pipefail
need=()
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || need+=(chromium)
command -v npm >/dev/null 2>&1 || need+=(npm)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing Debian packages: ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Keen's JavaScript tracking SDK (npm keen-tracking, pinned by package-lock.json) for
# tests/api/test_keen_sdk_browser.py, into the gitignored tests/browser/node_modules.
browser_dir="$(cd "$(dirname "$0")/.." && pwd)/tests/browser"
if [ ! -f "$browser_dir/node_modules/.package-lock.json" ] \
  || [ "$browser_dir/package-lock.json" -nt "$browser_dir/node_modules/.package-lock.json" ]; then
  npm ci --prefix "$browser_dir" --no-audit --no-fund
fi
