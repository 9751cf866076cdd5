#!/usr/bin/env bash
# The main job on one machine: local Kafka broker, a model (trained on generated data if none),
# the worker, demo events with injected anomalies, and the alerts printed as they arrive.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/bootstrap.sh
exec .venv/bin/stream-detector demo "$@"
