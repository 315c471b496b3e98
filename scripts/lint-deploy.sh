#!/usr/bin/env bash
# Checks the CloudFormation templates of deploy/ with cfn-lint (informational checks included) and
# the checkov policy scanner, both from PyPI into venvs under ${TOOLS_DIR:-.tools}; zero findings
# allowed, every suppression carries its reason in the template (Metadata.checkov.skip). The
# structural tests in tests/deploy.rs check what the code expects (IAM actions, environment,
# alarms' metrics). Then the Prometheus config and rules with promtool, when it is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=${TOOLS_DIR:-.tools}
venv() { # dir requirement -> installs once
  if [ ! -x "$tools/$1/bin/$1" ]; then
    python3 -m venv "$tools/$1"
    "$tools/$1/bin/pip" install --quiet --disable-pip-version-check "$2"
  fi
}
venv cfn-lint 'cfn-lint==1.58.0'
venv checkov 'checkov==3.3.30'
"$tools/cfn-lint/bin/cfn-lint" --include-checks I -- deploy/cloudformation/*.json
echo "cfn-lint: $(ls deploy/cloudformation/*.json | wc -l) templates clean (informational checks included)"
# --skip-download: no call to the vendor's platform (offline here); exits non-zero on any failed check.
"$tools/checkov/bin/checkov" --quiet --compact --skip-download --framework cloudformation \
  -d deploy/cloudformation
echo "checkov: no findings"
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
