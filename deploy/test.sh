#!/usr/bin/env bash
# Runs the whole test suite (unit tests, and integration tests against a real local Kafka broker).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/bootstrap.sh
exec .venv/bin/python -m pytest -q -rs "$@"
