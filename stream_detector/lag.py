"""Consumer lag of the worker's consumer group, exported as Prometheus gauges.

A background thread with its own Kafka client reads, every ``interval_s`` seconds, the committed
offsets of the worker's consumer group and the watermarks of the input topic's partitions, and sets
per partition:

- ``stream_detector_consumer_lag{topic,partition}``: high watermark minus committed offset (a
  partition the group has not committed on yet counts from its earliest offset under
  ``auto_offset_reset=earliest``, and as 0 under ``latest``);
- ``stream_detector_consumer_committed_offset`` and ``stream_detector_consumer_high_watermark``.

The client is a confluent-kafka ``Consumer`` configured with the worker's group id that never
subscribes, assigns or commits: it only sends OffsetFetch and ListOffsets requests, so it never joins
the group and cannot cause a rebalance. (``AdminClient.list_consumer_group_offsets`` is not used: with
confluent-kafka 2.16 it segfaults the process when the group coordinator answers NOT_COORDINATOR, as
on a fresh cluster before ``__consumer_offsets`` exists -- an admin client has no consumer group
handle to re-query the coordinator with; see confluent-kafka-python#1982 and
confluent-kafka-javascript#374. A consumer with a group id has one.)
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

from .metrics import WorkerMetrics

log = logging.getLogger("stream_detector.lag")

_NO_OFFSET = 0  # committed offsets below this (OFFSET_INVALID = -1001) mean "nothing committed"
_ERROR_LOG_EVERY_S = 60.0


@dataclass(frozen=True)
class PartitionLag:
    partition: int
    committed: int | None  # None: the group has not committed on this partition
    high_watermark: int
    lag: int


class ConsumerLagMonitor:
    """``start()`` it once; ``stop()`` joins the thread. ``poll_once()`` is the single read, for tests."""

    def __init__(self, bootstrap_servers: str, group: str, topic: str, metrics: WorkerMetrics,
                 interval_s: float = 5.0, auto_offset_reset: str = "earliest", timeout_s: float | None = None,
                 client_config: dict[str, Any] | None = None):
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.group = group
        self.topic = topic
        self.metrics = metrics
        self.interval_s = interval_s
        self.auto_offset_reset = auto_offset_reset
        self.timeout_s = timeout_s if timeout_s is not None else min(max(interval_s, 5.0), 30.0)
        self._config = {
            "bootstrap.servers": bootstrap_servers,
            "group.id": group,
            "client.id": f"{group}-lag-monitor",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            # librdkafka's own log lines go through Python logging (and the JSON formatter).
            "logger": logging.getLogger("stream_detector.lag.rdkafka"),
            **(client_config or {}),
        }
        self._client_instance: Consumer | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing_since: float | None = None
        self._last_error_log = 0.0

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> "ConsumerLagMonitor":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="consumer-lag", daemon=True)
            self._thread.start()
            log.info("consumer lag of group %s on %s every %.3gs", self.group, self.topic, self.interval_s)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # stuck in a broker call: the daemon thread ends with the process
                return
            self._thread = None
        if self._client_instance is not None:
            try:
                self._client_instance.close()  # never joined the group: nothing to leave or commit
            except (KafkaException, RuntimeError):
                pass
            self._client_instance = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as exc:  # noqa: BLE001 - whatever the broker does, the worker goes on
                self._on_error(exc)
            else:
                if self._failing_since is not None:
                    log.info("consumer lag readable again after %.0fs", time.monotonic() - self._failing_since)
                    self._failing_since = None
            self._stop.wait(self.interval_s)

    def _on_error(self, exc: BaseException) -> None:
        self.metrics.consumer_lag_errors.inc()
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        if now - self._last_error_log >= _ERROR_LOG_EVERY_S:
            self._last_error_log = now
            log.warning("cannot read consumer lag of group %s on %s (retrying every %.3gs): %s: %s",
                        self.group, self.topic, self.interval_s, type(exc).__name__, exc)

    # -- one read ------------------------------------------------------------------------------

    def _client(self) -> Consumer:
        if self._client_instance is None:
            self._client_instance = Consumer(self._config)
        return self._client_instance

    def poll_once(self) -> list[PartitionLag]:
        """Reads offsets once and updates the gauges; raises on broker errors."""
        client = self._client()
        client.poll(0)  # serves queued librdkafka log lines; without a subscription it fetches nothing
        partitions = self._partitions(client)
        tps = [TopicPartition(self.topic, p) for p in partitions]
        committed: dict[int, int | None] = {}
        for tp in client.committed(tps, timeout=self.timeout_s):
            if tp.error is not None:
                raise KafkaException(tp.error)
            committed[tp.partition] = tp.offset if tp.offset >= _NO_OFFSET else None

        out = []
        for p in partitions:
            low, high = client.get_watermark_offsets(TopicPartition(self.topic, p), timeout=self.timeout_s,
                                                     cached=False)
            done = committed.get(p)
            if done is not None:
                lag = high - done
            elif self.auto_offset_reset == "earliest":
                lag = high - low
            else:
                lag = 0
            out.append(PartitionLag(p, done, high, max(lag, 0)))
        for item in out:
            labels = {"topic": self.topic, "partition": str(item.partition)}
            self.metrics.consumer_lag.labels(**labels).set(item.lag)
            self.metrics.consumer_high_watermark.labels(**labels).set(item.high_watermark)
            if item.committed is not None:
                self.metrics.consumer_committed_offset.labels(**labels).set(item.committed)
        return out

    def _partitions(self, client: Consumer) -> list[int]:
        metadata = client.list_topics(topic=self.topic, timeout=self.timeout_s)
        topic = metadata.topics.get(self.topic)
        if topic is None:
            raise LookupError(f"topic {self.topic} not in the cluster metadata")
        if topic.error is not None:
            raise KafkaException(topic.error)
        if not topic.partitions:
            raise LookupError(f"topic {self.topic} has no partitions yet")
        return sorted(topic.partitions)
