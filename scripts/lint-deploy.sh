#!/usr/bin/env bash
# Checks the CloudFormation templates of deploy/ with cfn-lint (installed from PyPI into a venv
# under ${TOOLS_DIR:-.tools}); the structural tests in tests/deploy.rs check what the code expects.
# Then the Prometheus config and rules of deploy/prometheus with promtool, when it is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${TOOLS_DIR:-.tools}/cfn-lint
if [ ! -x "$dir/bin/cfn-lint" ]; then
  python3 -m venv "$dir"
  "$dir/bin/pip" install --quiet --disable-pip-version-check 'cfn-lint>=1,<2'
fi
"$dir/bin/cfn-lint" deploy/cloudformation/*.json
echo "cfn-lint: $(ls deploy/cloudformation/*.json | wc -l) templates clean"
# Prometheus scrape config, alert rules and their unit tests (tests/observability.rs parses the
# files and runs promtool too when it is installed; scripts/install-tools.sh installs it).
if command -v promtool >/dev/null 2>&1; then
  promtool check config deploy/prometheus/prometheus.yml
  promtool check rules deploy/prometheus/rules.yml
  promtool test rules deploy/prometheus/rules_test.yml
  echo "promtool: config, rules and rule tests clean"
else
  echo "promtool: not installed, Prometheus checks skipped here (scripts/install-tools.sh installs it; tests/observability.rs parses the files anyway)"
fi
