#!/usr/bin/env bash
# Runs every test of the workspace. Installs and starts whatever the tests need first
# (scripts/services.sh: moto for DynamoDB state and leases, kinesis-local for the consumer-group
# suites; scripts/install-tools.sh: Debian's chromium for the dashboard browser test and promtool
# for the Prometheus rules, and librdkafka's build tools; tansu, a Kafka-protocol broker, for the
# `kafka` feature's tests; the embedded backend needs nothing). The `kafka` feature is on:
# STOCKFLOW_FEATURES= (empty) runs without it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x scripts/services.sh ] && [ "${STOCKFLOW_SKIP_SERVICES:-0}" != 1 ]; then
  scripts/install-tools.sh
  scripts/services.sh install
  scripts/services.sh start
  trap 'scripts/services.sh stop >/dev/null 2>&1 || true' EXIT
fi
export DYNAMODB_ENDPOINT=${DYNAMODB_ENDPOINT:-http://127.0.0.1:5001}
export KINESIS_ENDPOINT=${KINESIS_ENDPOINT:-http://127.0.0.1:4568}
export KAFKA_BROKERS=${KAFKA_BROKERS:-127.0.0.1:9092}
# moto serves Secrets Manager too (webhook secrets).
export SECRETSMANAGER_ENDPOINT=${SECRETSMANAGER_ENDPOINT:-$DYNAMODB_ENDPOINT}
# The emulators accept any credentials; the SDK still wants some and a region.
export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-test} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-test} AWS_REGION=${AWS_REGION:-us-east-1}
FEATURES=${STOCKFLOW_FEATURES-kafka}
cargo test --release --workspace ${FEATURES:+--features "$FEATURES"} "$@"
