"""Everything the worker writes (alerts, dead letters, scores, window snapshots) goes out here.

A confluent-kafka (librdkafka) producer, idempotent (``acks=all``, ordered per partition, no
duplicates on retry), with its delivery reports handled on a small thread of its own (the worker
has two: one for window snapshots, which purges what it holds once the broker has been out of
reach too long, see :mod:`stream_detector.runtime.fencing`; one for the rest). The same thread
notes a stall: a delivery outstanding ``stall_s`` without any acknowledgement. The worker
sends a batch's messages as one :class:`Deliveries` group and awaits the group: one event-loop
wake-up per group instead of a future and a task hop per message, and the encoding and batching
happen in C. Measured against Faust's own (aiokafka) producer, which spent about a third of the
event loop on one changelog write per touched key: see ``benchmarks/results/throughput.md``.

Faust keeps consuming and committing; it is not asked to produce anything.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Sequence

from confluent_kafka import KafkaError, Producer

from ..errors import DeliveryError

log = logging.getLogger(__name__)

# Messages produced within this many ms share a request. Short: alerts are on the latency path,
# and a micro-batch's snapshot burst is produced in one go anyway (it batches by itself).
LINGER_MS = 2
_POLL_S = 0.05
# librdkafka's default `message.max.bytes`: produce() refuses a larger record (key, value, headers).
DEFAULT_MAX_MESSAGE_BYTES = 1_000_000

_PURGED = (KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT)

__all__ = ["DeliveryError", "Deliveries", "OutputProducer"]


class Deliveries:
    """A group of messages whose delivery is awaited together (:meth:`wait`).

    Delivery reports arrive on the producer's poll thread; the group is resolved on the event loop
    once every message it holds is acknowledged (or failed). Only the poll thread writes
    ``_acked``, only the loop thread writes ``_sent`` and ``_sealed``: whichever sees the last
    report resolves the group, and resolving twice is harmless.
    """

    __slots__ = ("_out", "_loop", "_sent", "_acked", "_sealed", "_error", "_future")

    def __init__(self, out: "OutputProducer", loop: asyncio.AbstractEventLoop):
        self._out = out
        self._loop = loop
        self._sent = 0
        self._acked = 0
        self._sealed = False
        self._error: KafkaError | None = None
        self._future: asyncio.Future | None = None

    def __len__(self) -> int:
        return self._sent

    def send(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None,
             headers: Sequence[tuple[str, bytes]] | None = None, timestamp_ms: int | None = None) -> None:
        self._out.produce(topic, key, value, partition, headers, self._on_delivery, timestamp_ms)
        self._sent += 1

    def _on_delivery(self, err: KafkaError | None, _msg: Any) -> None:  # poll thread
        self._out.reports += 1
        if err is not None and self._error is None:
            self._error = err
        self._acked += 1
        if self._sealed and self._acked == self._sent:
            try:
                self._loop.call_soon_threadsafe(self._resolve)
            except RuntimeError:  # the loop is closed: nobody awaits this group any more
                pass

    def _resolve(self) -> None:  # loop thread
        future = self._future
        if future is None or future.done():
            return
        if self._error is not None:
            error = DeliveryError(f"delivery failed: {self._error}")
            # Purged (see OutputProducer's purge_after_s): not refused by the broker, maybe not written.
            error.purged = self._error.code() in _PURGED
            future.set_exception(error)
        else:
            future.set_result(self._sent)

    def wait(self) -> asyncio.Future:
        """A future done when every message sent so far is acknowledged; no more may be sent."""
        if self._future is None:
            self._future = self._loop.create_future()
            self._sealed = True
            if self._acked == self._sent:
                self._resolve()
        return self._future


class OutputProducer:
    """An idempotent confluent-kafka producer with a delivery-report thread, for asyncio code."""

    def __init__(self, bootstrap_servers: str, client_config: dict[str, Any] | None = None,
                 linger_ms: float = LINGER_MS, extra: dict[str, Any] | None = None, stall_s: float = 1.0,
                 purge_after_s: float | None = None):
        config = {
            "bootstrap.servers": bootstrap_servers,
            "enable.idempotence": True,  # acks=all, in order per partition, no duplicates on retry
            "linger.ms": linger_ms,
            "logger": logging.getLogger(__name__ + ".librdkafka"),
            **(client_config or {}),
            **(extra or {}),
        }
        # The largest record produce() accepts: dead letters are cut to fit it (see runtime.dead_letters).
        self.max_message_bytes = int(config.get("message.max.bytes", DEFAULT_MAX_MESSAGE_BYTES))
        self._producer = Producer(config)
        self._stall_s = stall_s
        # Set by the poll thread: monotonic time of the last delivery report or of the last moment
        # nothing was outstanding; and whether a delivery went unacknowledged for `stall_s` since
        # `stalled()` was last asked (the broker out of reach: see runtime.fencing).
        self._last_contact = time.monotonic()
        self._stalled = False
        self.reports = 0  # delivery reports handled (poll thread only): poll() also serves logs and errors
        # With purge_after_s: after that long without any acknowledgement, everything outstanding is
        # purged, so that nothing written before the broker went out of reach is sent when it is
        # back; each purged message fails its group with a DeliveryError whose `purged` is True.
        self._purge_after_s = purge_after_s
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._last_contact = time.monotonic()  # not the construction's: a first send may come much later
            self._thread = threading.Thread(target=self._poll, name="output-deliveries", daemon=True)
            self._thread.start()

    def _poll(self) -> None:
        producer, stopping, monotonic = self._producer, self._stopping, time.monotonic
        poll = producer.poll
        seen = self.reports
        while not stopping.is_set():
            try:
                poll(_POLL_S)
            except Exception:  # raised by a delivery callback: keep reporting the others
                log.exception("delivery report handling failed")
            now = monotonic()
            if self.reports != seen or not len(producer):
                seen = self.reports
                self._last_contact = now
            elif now - self._last_contact >= self._stall_s:
                self._stalled = True
                if self._purge_after_s is not None and now - self._last_contact >= self._purge_after_s:
                    log.warning("%d message(s) unacknowledged for %.1f s: purged (the broker is out of reach)",
                                len(producer), now - self._last_contact)
                    producer.purge(in_queue=True, in_flight=True, blocking=False)
                    self._last_contact = now

    def stalled(self) -> bool:
        """Whether a delivery went ``stall_s`` without any acknowledgement since the last call (the
        broker out of reach, or slower than that); the call forgets it."""
        if not self._stalled:
            return False
        self._stalled = False
        return True

    def reachable(self) -> bool:
        """Whether the broker answers now: nothing outstanding, or an acknowledgement within ``stall_s``."""
        return not len(self._producer) or time.monotonic() - self._last_contact < self._stall_s

    def group(self) -> Deliveries:
        """A new group of messages to await together; call from the event loop."""
        self.start()
        return Deliveries(self, asyncio.get_running_loop())

    def produce(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None,
                headers: Sequence[tuple[str, bytes]] | None, on_delivery: Any, timestamp_ms: int | None = None) -> None:
        """Queues one message; blocks briefly (backpressure) while librdkafka's queue is full."""
        kwargs: dict[str, Any] = {"key": key, "value": value, "on_delivery": on_delivery}
        if partition is not None:
            kwargs["partition"] = partition
        if headers:
            kwargs["headers"] = list(headers)
        if timestamp_ms:  # the record's own time (a forwarded event keeps its input record's)
            kwargs["timestamp"] = timestamp_ms
        while True:
            try:
                self._producer.produce(topic, **kwargs)
                return
            except BufferError:  # the poll thread drains the queue as the broker acknowledges
                time.sleep(0.005)

    def partitions(self, topic: str, timeout: float = 10.0) -> int:
        """The topic's partition count, read from the broker: the producer's metadata of the topic is
        refreshed with it (after a topic grew, a write to a new partition is refused until then)."""
        return len(self._producer.list_topics(topic, timeout=timeout).topics[topic].partitions)

    def in_flight(self) -> int:
        """Messages queued or sent and not yet acknowledged."""
        return len(self._producer)

    def flush(self, timeout: float) -> int:
        """Waits for what is queued; returns how many messages are still undelivered."""
        return self._producer.flush(timeout)

    def close(self, timeout: float = 10.0) -> None:
        self._stopping.set()  # reports are handled by flush() below, on this thread alone
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None
        left = self.flush(timeout)
        if left:
            log.warning("%d output message(s) not delivered at shutdown", left)
