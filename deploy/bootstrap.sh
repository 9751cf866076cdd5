#!/usr/bin/env bash
# Sets up everything the project needs on a fresh machine; safe to run again (it skips what is done).
#  - .venv with the project and its dev, eval and schema-registry extras (PyTorch comes from PyPI: large, installed once)
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

# Operations tools for tests/test_operations.py: Debian's prometheus (prometheus + promtool), amtool
# (prometheus-alertmanager) and
# docker-compose (validates the compose file offline; no Docker engine needed). Installed only where
# apt-get is usable as root; elsewhere those tests skip and say why.
apt_install() {  # apt_install PACKAGE...: no recommends (docker-compose recommends docker.io), no services started
  local policy=/usr/sbin/policy-rc.d created_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created_policy=1
  fi
  if [ -z "${_apt_updated:-}" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq && _apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  local rc=$?
  if [ "$created_policy" = 1 ]; then rm -f "$policy"; fi
  return $rc
}
packaged_prometheus_pids() {  # processes named prometheus owned by the package's user (no procps needed)
  local uid d
  uid=$(id -u prometheus 2>/dev/null) || return 0
  for d in /proc/[0-9]*; do
    if [ "$(cat "$d/comm" 2>/dev/null)" = prometheus ] && [ "$(stat -c %u "$d" 2>/dev/null)" = "$uid" ]; then
      echo "${d#/proc/}"
    fi
  done
}
stop_packaged_prometheus() {  # the package's own daemon (0.0.0.0:9090) must not be left running
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
  local pids
  pids=$(packaged_prometheus_pids)
  if [ -n "$pids" ]; then
    echo "bootstrap: stopping the prometheus service the Debian package started"
    if [ -x /etc/init.d/prometheus ]; then /etc/init.d/prometheus stop >/dev/null 2>&1 || true; fi
    for pid in $(packaged_prometheus_pids); do kill "$pid" 2>/dev/null || true; done
  fi
}
can_apt=0
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then can_apt=1; fi
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  if [ "$can_apt" = 1 ]; then
    echo "bootstrap: installing Debian's prometheus package (prometheus, promtool)"
    apt_install prometheus || echo "bootstrap: could not install prometheus; tests/test_operations.py will skip what needs it" >&2
    stop_packaged_prometheus
  else
    echo "bootstrap: prometheus/promtool missing and apt-get unusable (not root?); operations tests will skip" >&2
  fi
fi
if ! command -v amtool >/dev/null 2>&1; then
  if [ "$can_apt" = 1 ]; then
    echo "bootstrap: installing Debian's prometheus-alertmanager package (amtool checks deploy/alertmanager)"
    apt_install prometheus-alertmanager || echo "bootstrap: could not install prometheus-alertmanager; its test will skip" >&2
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
      systemctl disable --now prometheus-alertmanager >/dev/null 2>&1 || true  # only amtool is wanted
    fi
  else
    echo "bootstrap: amtool missing and apt-get unusable (not root?); the Alertmanager config test will skip" >&2
  fi
fi
if ! command -v docker-compose >/dev/null 2>&1; then
  if [ "$can_apt" = 1 ]; then
    echo "bootstrap: installing Debian's docker-compose package (to validate docker-compose.yml)"
    apt_install docker-compose || echo "bootstrap: could not install docker-compose; its test will skip" >&2
  else
    echo "bootstrap: docker-compose missing and apt-get unusable (not root?); its test will skip" >&2
  fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "bootstrap: installing the project and its dependencies into .venv (first time: several minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[dev,eval,schema-registry]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
bash deploy/kafka/fetch-kafka.sh
