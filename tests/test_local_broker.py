"""Integration tests for the real local Kafka broker (LocalBroker)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer

from stream_detector.kafka.local_broker import LocalBroker, ensure_topics

pytestmark = pytest.mark.integration


def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for i, value in enumerate(values):
        producer.produce(topic, key=str(i).encode(), value=value)
    assert producer.flush(30) == 0, "messages left undelivered"


def _consume(bootstrap: str, topic: str, expected: int, timeout: float = 30) -> list[bytes]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    values: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while len(values) < expected and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            values.append(msg.value())
    finally:
        consumer.close()
    return values


def test_produce_consume_round_trip(kafka_broker: LocalBroker, unique_topic: str) -> None:
    sent = [f"msg-{i}".encode() for i in range(100)]
    _produce(kafka_broker.bootstrap_servers, unique_topic, sent)
    assert _consume(kafka_broker.bootstrap_servers, unique_topic, len(sent)) == sent


def test_make_topic_partitions(kafka_broker: LocalBroker, make_topic) -> None:
    from confluent_kafka.admin import AdminClient

    topic = make_topic("parts", partitions=3)
    md = AdminClient({"bootstrap.servers": kafka_broker.bootstrap_servers}).list_topics(topic, 10)
    assert len(md.topics[topic].partitions) == 3
    # Creating it again is a no-op, not an error.
    ensure_topics(kafka_broker.bootstrap_servers, {topic: 3})


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """A private broker, so restarts and crashes don't disturb the session broker."""
    broker = LocalBroker(data_dir=tmp_path / "kafka")
    broker.start(timeout=120)
    try:
        yield broker
    finally:
        broker.stop()


def test_restart_keeps_messages(own_broker: LocalBroker) -> None:
    topic = "persisted"
    bootstrap = own_broker.bootstrap_servers
    ensure_topics(bootstrap, {topic: 2})
    sent = [f"v{i}".encode() for i in range(50)]
    _produce(bootstrap, topic, sent)

    own_broker.stop()
    assert not own_broker.is_running()
    own_broker.start(timeout=120)

    assert own_broker.bootstrap_servers == bootstrap
    assert sorted(_consume(bootstrap, topic, len(sent))) == sorted(sent)


def test_kill_then_restart(own_broker: LocalBroker) -> None:
    topic = "crashy"
    bootstrap = own_broker.bootstrap_servers
    ensure_topics(bootstrap, {topic: 1})
    sent = [f"before-crash-{i}".encode() for i in range(20)]
    _produce(bootstrap, topic, sent)

    own_broker.kill()
    assert not own_broker.is_running()
    own_broker.restart(timeout=120)
    assert own_broker.is_running()

    more = [f"after-crash-{i}".encode() for i in range(20)]
    _produce(bootstrap, topic, more)
    # Acked (acks=all) messages survive SIGKILL: the OS page cache keeps them.
    assert _consume(bootstrap, topic, len(sent) + len(more)) == sent + more
