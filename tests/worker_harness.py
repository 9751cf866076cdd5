"""Runs the real worker as a subprocess against the test broker, as a user would run it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import Consumer, Message, TopicPartition
from prometheus_client.parser import text_string_to_metric_families


def read_records(bootstrap: str, topic: str, idle_s: float = 2.0, first_s: float = 5.0) -> list[Message]:
    """Every record of every partition of ``topic`` from its start (no consumer group), in order per
    partition: read until ``idle_s`` without a record (``first_s`` before the first)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"read-{uuid.uuid4().hex[:8]}",
                         "enable.auto.commit": False})
    out: list[Message] = []
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        idle_until = time.monotonic() + first_s
        while time.monotonic() < idle_until:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            idle_until = time.monotonic() + idle_s
            out.append(msg)
    finally:
        consumer.close()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class WorkerProcess:
    bootstrap_servers: str
    model_dir: Path
    log_path: Path
    input_topic: str = field(default_factory=lambda: f"events-{uuid.uuid4().hex[:10]}")
    alerts_topic: str = field(default_factory=lambda: f"alerts-{uuid.uuid4().hex[:10]}")
    dead_letter_topic: str = field(default_factory=lambda: f"dlq-{uuid.uuid4().hex[:10]}")
    consumer_group: str = field(default_factory=lambda: f"detector-{uuid.uuid4().hex[:10]}")
    metrics_port: int = field(default_factory=free_port)
    extra_env: dict[str, str] = field(default_factory=dict)
    # The command line; the real worker by default (a test may run a launcher that wraps it).
    command: list[str] = field(default_factory=lambda: [sys.executable, "-m", "stream_detector", "worker"])
    process: subprocess.Popen | None = None

    def sibling(self, log_path: Path, bootstrap_servers: str | None = None) -> "WorkerProcess":
        """Another worker of the same group, on the same topics, with the same settings (and command);
        ``bootstrap_servers`` to reach the broker another way (through a proxy, say)."""
        return WorkerProcess(bootstrap_servers or self.bootstrap_servers, self.model_dir, log_path,
                             input_topic=self.input_topic, alerts_topic=self.alerts_topic,
                             dead_letter_topic=self.dead_letter_topic, consumer_group=self.consumer_group,
                             extra_env=dict(self.extra_env), command=list(self.command))

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_DETECTOR_")}
        env.update({
            "STREAM_DETECTOR_BOOTSTRAP_SERVERS": self.bootstrap_servers,
            "STREAM_DETECTOR_INPUT_TOPIC": self.input_topic,
            "STREAM_DETECTOR_ALERTS_TOPIC": self.alerts_topic,
            "STREAM_DETECTOR_DEAD_LETTER_TOPIC": self.dead_letter_topic,
            "STREAM_DETECTOR_CONSUMER_GROUP": self.consumer_group,
            "STREAM_DETECTOR_MODEL_DIR": str(self.model_dir),
            "STREAM_DETECTOR_METRICS_PORT": str(self.metrics_port),
            "STREAM_DETECTOR_TORCH_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 120.0) -> "WorkerProcess":
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.command, env=self.env(),
                                        stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.assert_alive()
            try:
                self.metrics()
                return self
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"worker metrics did not come up; log:\n{self.log_tail()}")

    def assert_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"worker exited with {self.process.returncode}; log:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no log>"

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as resp:
            return resp.read().decode()

    def metrics(self) -> dict[str, float]:
        """Every sample as name{labels} -> value."""
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(self.metrics_text()):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return out

    def wait_for_metric(self, name: str, at_least: float, timeout: float = 180.0) -> float:
        deadline = time.monotonic() + timeout
        value = 0.0
        while time.monotonic() < deadline:
            self.assert_alive()
            value = self.metrics().get(name, 0.0)
            if value >= at_least:
                return value
            time.sleep(0.5)
        raise AssertionError(f"{name} reached {value}, expected >= {at_least}; log:\n{self.log_tail()}")
