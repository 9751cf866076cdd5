"""Demo producer and alert reader: the two ends a user of the detector sees."""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable, Iterator

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer

from .synthetic import LabelledEvent


class _RepeatFilter(logging.Filter):
    """Passes a librdkafka log line once per ``every_s``: an unreachable broker is otherwise
    reported twenty times a second."""

    def __init__(self, every_s: float = 30.0):
        super().__init__()
        self.every_s = every_s
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message, now = record.getMessage(), time.monotonic()
        if now - self._last.get(message, -self.every_s) < self.every_s:
            return False
        self._last[message] = now
        return True


# librdkafka's log lines of these clients go through Python logging (and the JSON formatter).
_rdkafka_log = logging.getLogger("stream_detector.producer.rdkafka")
_rdkafka_log.addFilter(_RepeatFilter())


def produce_events(bootstrap_servers: str, topic: str, events: Iterable[LabelledEvent], rate: float = 0.0,
                   on_progress: Callable[[int], None] | None = None, extra_config: dict | None = None) -> int:
    """Publishes events keyed by their key, paced to ``rate`` events/s (0 = as fast as possible).

    Returns the number of events the broker acknowledged; raises if any delivery failed.
    """
    config = {"bootstrap.servers": bootstrap_servers, "linger.ms": 5, "logger": _rdkafka_log,
              **(extra_config or {}), "acks": "all", "enable.idempotence": True}
    producer = Producer(config)
    _check_reachable(producer, bootstrap_servers)
    failures: list[str] = []
    delivered = 0

    def on_delivery(err, _msg) -> None:
        nonlocal delivered
        if err is not None:
            failures.append(str(err))
        else:
            delivered += 1

    started = time.perf_counter()
    for i, event in enumerate(events):
        if rate > 0:
            ahead = started + i / rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
        payload = orjson.dumps(event.to_message())
        while True:
            try:
                producer.produce(topic, key=event.key.encode(), value=payload, on_delivery=on_delivery)
                break
            except BufferError:  # local queue full: let deliveries drain
                producer.poll(0.05)
        producer.poll(0)
        if on_progress is not None and (i + 1) % 1000 == 0:
            on_progress(i + 1)
    producer.flush(60)
    if failures:
        raise RuntimeError(f"{len(failures)} event(s) not delivered, first: {failures[0]}")
    return delivered


def iter_messages(bootstrap_servers: str, topic: str, group: str | None = None, from_beginning: bool = True,
                  idle_timeout: float | None = None, extra_config: dict | None = None,
                  stop: Callable[[], bool] | None = None) -> Iterator[dict]:
    """Yields JSON messages of a topic; stops after ``idle_timeout`` seconds without one (None = never),
    or at a quiet moment (no message within 0.2 s) once ``stop()`` says so."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap_servers,
        "group.id": group or f"reader-{time.time_ns()}",
        "auto.offset.reset": "earliest" if from_beginning else "latest",
        "logger": _rdkafka_log,
        **(extra_config or {}),
        "enable.auto.commit": group is not None,
    })
    _check_reachable(consumer, bootstrap_servers)
    consumer.subscribe([topic])
    last = time.monotonic()
    try:
        while True:
            msg = consumer.poll(0.2)
            if msg is None:
                if idle_timeout is not None and time.monotonic() - last > idle_timeout:
                    return
                if stop is not None and stop():
                    return
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    continue
                raise RuntimeError(f"consumer error: {msg.error()}")
            last = time.monotonic()
            yield orjson.loads(msg.value())
    finally:
        consumer.close()


def publish_message(bootstrap_servers: str, topic: str, key: bytes, value: bytes,
                    extra_config: dict | None = None, timeout_s: float = 30.0) -> None:
    """Publishes one message and waits for the broker's acknowledgement; raises if it is not given."""
    producer = Producer({"bootstrap.servers": bootstrap_servers, "logger": _rdkafka_log, **(extra_config or {}),
                         "acks": "all", "enable.idempotence": True})
    _check_reachable(producer, bootstrap_servers)
    failures: list[str] = []
    producer.produce(topic, key=key, value=value,
                     on_delivery=lambda err, _msg: failures.append(str(err)) if err is not None else None)
    if producer.flush(timeout_s):
        raise RuntimeError(f"message to {topic} not acknowledged within {timeout_s:.0f}s")
    if failures:
        raise RuntimeError(f"message to {topic} not delivered: {failures[0]}")


def find_incident_key(bootstrap_servers: str, alerts_topic: str, incident_id: str, extra_config: dict | None = None,
                      idle_timeout: float = 5.0) -> str | None:
    """The key of the incident ``incident_id``, from its alert messages (the alerts topic read from the
    beginning until it is quiet for ``idle_timeout`` seconds); None when none is found."""
    for alert in iter_messages(bootstrap_servers, alerts_topic, idle_timeout=idle_timeout, extra_config=extra_config):
        if isinstance(alert, dict) and alert.get("incident_id") == incident_id and isinstance(alert.get("key"), str):
            return alert["key"]
    return None


REACHABLE_TIMEOUT_S = 10.0  # how long a command waits for the first broker answer


class BrokerUnreachable(RuntimeError):
    """No broker of the bootstrap list answered (wrong address, security settings, or down)."""


def _check_reachable(client: Producer | Consumer, bootstrap_servers: str, timeout_s: float | None = None) -> None:
    """Fails at once, naming the address, rather than waiting (or reading nothing) for ever."""
    timeout_s = REACHABLE_TIMEOUT_S if timeout_s is None else timeout_s
    try:
        client.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        if isinstance(client, Consumer):
            client.close()
        raise BrokerUnreachable(f"no Kafka broker answered at {bootstrap_servers} within {timeout_s:.0f}s "
                                f"({exc.args[0].str() if exc.args and hasattr(exc.args[0], 'str') else exc}); "
                                "check bootstrap_servers and the security settings") from None
