#!/usr/bin/env bash
# Runs every test of the workspace. Installs and starts whatever the tests need first
# (the embedded backend needs nothing; emulator-backed suites start theirs via scripts/services.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x scripts/services.sh ] && [ "${STOCKFLOW_SKIP_SERVICES:-0}" != 1 ]; then
  scripts/services.sh install
  scripts/services.sh start
  trap 'scripts/services.sh stop >/dev/null 2>&1 || true' EXIT
fi
cargo test --release --workspace "$@"
