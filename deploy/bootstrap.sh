#!/usr/bin/env bash
# Sets up everything the project needs on a fresh machine; safe to run again (it skips what is done).
#  - .venv with the project and its dev/eval extras (PyTorch comes from PyPI: large, installed once)
#  - Apache Kafka 3.9.1 jars from Maven Central into .cache/ (for the local broker)
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in java mvn; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless maven >/dev/null
    else
      echo "bootstrap: '$tool' is required (Java 17 and Maven run the local Kafka broker)" >&2
      exit 1
    fi
  fi
done

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "bootstrap: installing the project and its dependencies into .venv (first time: several minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[dev,eval]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
bash deploy/kafka/fetch-kafka.sh
