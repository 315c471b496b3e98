#!/usr/bin/env bash
# Checks the CloudFormation templates of deploy/ with cfn-lint (installed from PyPI into a venv
# under ${TOOLS_DIR:-.tools}); the structural tests in tests/deploy.rs check what the code expects.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${TOOLS_DIR:-.tools}/cfn-lint
if [ ! -x "$dir/bin/cfn-lint" ]; then
  python3 -m venv "$dir"
  "$dir/bin/pip" install --quiet --disable-pip-version-check 'cfn-lint>=1,<2'
fi
"$dir/bin/cfn-lint" deploy/cloudformation/*.json
echo "cfn-lint: $(ls deploy/cloudformation/*.json | wc -l) templates clean"
