"""The worker's output producer against the real local broker: a group resolves only once every
message in it is acknowledged, in order per partition, and a failed delivery fails the group."""

from __future__ import annotations

import asyncio

import pytest

from stream_detector.kafka.output import DeliveryError, OutputProducer
from stream_detector.producer import iter_messages

pytestmark = pytest.mark.integration


def _raw_messages(bootstrap: str, topic: str, partitions: int, expected: int,
                  timeout: float = 30.0) -> list[tuple[bytes, bytes | None, int]]:
    """Every record of the topic, read from the start of each partition (no consumer group)."""
    import time

    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"check-{topic}", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    out = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expected and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and not msg.error():
                out.append((msg.key(), msg.value(), msg.partition()))
    finally:
        consumer.close()
    return out


def test_a_group_resolves_once_every_message_is_in_the_topic_in_order(kafka_broker, make_topic):
    topic = make_topic("out", partitions=2)
    out = OutputProducer(kafka_broker.bootstrap_servers)

    async def main() -> int:
        group = out.group()
        for i in range(500):
            group.send(topic, f"k{i % 7}".encode(), str(i).encode(), partition=i % 2)
        group.send(topic, b"k0", None, partition=0)  # a delete (tombstone)
        return await asyncio.wait_for(group.wait(), timeout=30)

    try:
        assert asyncio.run(main()) == 501
    finally:
        out.close()
    seen = _raw_messages(kafka_broker.bootstrap_servers, topic, partitions=2, expected=501)
    assert len(seen) == 501
    for partition in (0, 1):  # in the order sent, per partition
        values = [v for _, v, p in seen if p == partition and v is not None]
        assert values == [str(i).encode() for i in range(partition, 500, 2)]
    assert [m for m in seen if m[2] == 0][-1] == (b"k0", None, 0)  # the delete came last, as sent


def test_an_empty_group_resolves_at_once_and_alerts_read_back_as_json(kafka_broker, unique_topic):
    out = OutputProducer(kafka_broker.bootstrap_servers)

    async def main() -> None:
        assert await asyncio.wait_for(out.group().wait(), timeout=1) == 0
        group = out.group()
        group.send(unique_topic, b"card-1", b'{"key": "card-1", "state": "open"}',
                   headers=[("x-test", b"1")])
        await asyncio.wait_for(group.wait(), timeout=30)

    try:
        asyncio.run(main())
    finally:
        out.close()
    assert list(iter_messages(kafka_broker.bootstrap_servers, unique_topic, idle_timeout=3.0)) == [
        {"key": "card-1", "state": "open"}]


def test_a_failed_delivery_fails_its_group(kafka_broker, unique_topic):
    # A partition the topic does not have: librdkafka reports the message as failed.
    out = OutputProducer(kafka_broker.bootstrap_servers, extra={"message.timeout.ms": 3000})

    async def main() -> None:
        group = out.group()
        group.send(unique_topic, b"k", b"ok")
        group.send(unique_topic, b"k", b"lost", partition=7)
        await asyncio.wait_for(group.wait(), timeout=30)

    try:
        with pytest.raises(DeliveryError):
            asyncio.run(main())
    finally:
        out.close(timeout=5)


def test_reading_without_an_idle_timeout_ends_at_a_quiet_moment_once_told_to(kafka_broker, unique_topic):
    """The demo's reader: it must end after its last message even when none follows (it used to
    check its end condition only when a message arrived, and then waited forever)."""
    import time

    out = OutputProducer(kafka_broker.bootstrap_servers)

    async def send() -> None:
        group = out.group()
        group.send(unique_topic, b"k", b'{"n": 1}')
        await asyncio.wait_for(group.wait(), timeout=30)

    try:
        asyncio.run(send())
    finally:
        out.close()
    seen: list[dict] = []
    stop_after = time.monotonic() + 3.0
    started = time.monotonic()
    for message in iter_messages(kafka_broker.bootstrap_servers, unique_topic,
                                 stop=lambda: bool(seen) and time.monotonic() > stop_after):
        seen.append(message)
    assert seen == [{"n": 1}]
    assert time.monotonic() - started < 30
