#!/usr/bin/env bash
# scripts/install-tools.sh: the tools of the checks beyond cargo, from Debian's packages:
#   chromium    headless browser of the dashboard browser test
#   prometheus  for promtool (scripts/lint-deploy.sh, tests/observability.rs)
#   cmake, libssl-dev, zlib1g-dev
#               to build librdkafka from source for the `kafka` feature (rdkafka's cmake-build,
#               SSL for SASL/SCRAM and MSK IAM, zlib; no curl: librdkafka is built WITH_CURL=0)
# Installs only what is missing (a quick no-op when both are there), non-interactively and without
# recommended packages. The prometheus package would start a Prometheus service: a policy-rc.d that
# refuses service starts is in place during the install (and removed after, unless it was there).
# Uses sudo when not root. `apt-get update` only runs if the first install attempt fails.
set -euo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v cmake >/dev/null 2>&1 || need+=(cmake)
[ -e /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
[ -e /usr/include/zlib.h ] || need+=(zlib1g-dev)
if [ ${#need[@]} -eq 0 ]; then
  echo "tools: chromium, promtool and librdkafka's build tools already installed"
  exit 0
fi
command -v apt-get >/dev/null 2>&1 || { echo "install-tools: no apt-get here; install ${need[*]} yourself" >&2; exit 1; }
SUDO=
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "install-tools: not root and no sudo; install ${need[*]} as root" >&2; exit 1; }
  SUDO=sudo
fi
POLICY=/usr/sbin/policy-rc.d
if [ ! -e "$POLICY" ]; then
  trap '$SUDO rm -f "$POLICY"' EXIT
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
  $SUDO chmod 755 "$POLICY"
fi
apt() { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -q -y -o Dpkg::Use-Pty=0 "$@"; }
if ! apt install --no-install-recommends "${need[@]}"; then
  echo "install-tools: install failed; updating the package lists and retrying" >&2
  apt update
  apt install --no-install-recommends "${need[@]}"
fi
for tool in chromium promtool cmake; do
  command -v "$tool" >/dev/null 2>&1 || { echo "install-tools: $tool still missing after installing ${need[*]}" >&2; exit 1; }
done
echo "tools: installed ${need[*]} ($(chromium --version 2>/dev/null | head -1); $(promtool --version 2>&1 | head -1))"
