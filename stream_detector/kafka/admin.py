"""Topic administration shared by the worker, the demo and the tests."""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

_POLL_INTERVAL_S = 0.2


class TopicError(RuntimeError):
    """Topics could not be created or did not become usable in time."""


def ensure_topics(
    bootstrap_servers: str,
    topics: dict[str, int],
    timeout: float = 30,
    config: dict | None = None,
    client_config: dict | None = None,
    replication_factor: int = -1,
    topic_configs: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Create topics (name -> partition count) if missing; an existing topic is left as it is.

    ``replication_factor`` -1 lets the broker choose (its ``default.replication.factor``).
    ``config`` is topic-level configuration applied to newly created topics
    (e.g. ``{"retention.ms": "60000"}``), ``topic_configs`` per topic on top of it. Waits until
    metadata shows every topic with all partitions led, so producers/consumers can use them right away.
    """
    if not topics:
        return
    deadline = time.monotonic() + timeout
    admin = AdminClient(
        {
            "bootstrap.servers": bootstrap_servers,
            "logger": logging.getLogger(__name__ + ".librdkafka"),
            **(client_config or {}),
        }
    )
    new_topics = [
        NewTopic(name, num_partitions=parts, replication_factor=replication_factor,
                 config={k: str(v).lower() if isinstance(v, bool) else str(v)
                         for k, v in {**(config or {}), **(topic_configs or {}).get(name, {})}.items()})
        for name, parts in topics.items()
    ]
    futures = admin.create_topics(new_topics, request_timeout=max(timeout, 1.0))
    for name, fut in futures.items():
        try:
            fut.result(timeout=max(deadline - time.monotonic(), 0.1))
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise TopicError(f"creating topic {name!r} failed: {exc}") from exc

    missing: dict[str, str] = dict.fromkeys(topics, "not in metadata")
    while True:
        try:
            md = admin.list_topics(timeout=max(min(5.0, deadline - time.monotonic()), 0.2))
            for name, parts in topics.items():
                tmd = md.topics.get(name)
                if tmd is None or tmd.error is not None:
                    missing[name] = str(tmd.error) if tmd is not None else "not in metadata"
                elif len(tmd.partitions) < parts:
                    missing[name] = f"{len(tmd.partitions)}/{parts} partitions"
                elif any(p.leader < 0 for p in tmd.partitions.values()):
                    missing[name] = "partition without leader"
                else:
                    missing.pop(name, None)
        except KafkaException as exc:
            missing = {name: str(exc) for name in topics}
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise TopicError(f"topics not ready after {timeout:.0f}s: {missing}")
        time.sleep(_POLL_INTERVAL_S)


def partition_count(bootstrap_servers: str, topic: str, client_config: dict | None = None,
                    timeout: float = 30) -> int:
    """Partitions of an existing topic (the worker sizes its state changelog to match)."""
    admin = AdminClient({"bootstrap.servers": bootstrap_servers,
                         "logger": logging.getLogger(__name__ + ".librdkafka"), **(client_config or {})})
    md = admin.list_topics(topic, timeout=timeout)
    tmd = md.topics.get(topic)
    if tmd is None or tmd.error is not None or not tmd.partitions:
        raise TopicError(f"topic {topic!r} not found: {tmd.error if tmd else 'no metadata'}")
    return len(tmd.partitions)


def grow_partitions(bootstrap_servers: str, topic: str, partitions: int, client_config: dict | None = None,
                    timeout: float = 30) -> int:
    """Grows an existing topic to ``partitions`` if it has fewer (a topic never shrinks); waits until
    metadata shows them all led. The partition count now. The worker keeps its changelog as wide as
    its input: a snapshot is written to the input record's partition number."""
    admin = AdminClient({"bootstrap.servers": bootstrap_servers,
                         "logger": logging.getLogger(__name__ + ".librdkafka"), **(client_config or {})})
    deadline = time.monotonic() + timeout
    # Every topic listed: a metadata request naming a missing topic has a broker with
    # auto.create.topics.enable create it (with its default partitions and cleanup policy).
    tmd = admin.list_topics(timeout=timeout).topics.get(topic)
    if tmd is None or tmd.error is not None or not tmd.partitions:
        raise TopicError(f"topic {topic!r} not found: {tmd.error if tmd else 'not in metadata'}")
    have = len(tmd.partitions)
    if have >= partitions:
        return have
    from confluent_kafka.admin import NewPartitions

    try:
        admin.create_partitions([NewPartitions(topic, partitions)],
                                request_timeout=max(timeout, 1.0))[topic].result(timeout=timeout)
    except KafkaException as exc:
        err = exc.args[0] if exc.args else None
        # Another worker grew it first (INVALID_PARTITIONS: it has that many already).
        if not (isinstance(err, KafkaError) and err.code() == KafkaError.INVALID_PARTITIONS):
            raise TopicError(f"growing topic {topic!r} to {partitions} partitions failed: {exc}") from exc
    while True:
        tmd = admin.list_topics(timeout=max(min(5.0, deadline - time.monotonic()), 0.2)).topics.get(topic)
        if tmd is not None and tmd.error is None and len(tmd.partitions) >= partitions \
                and all(p.leader >= 0 for p in tmd.partitions.values()):
            return len(tmd.partitions)
        if time.monotonic() >= deadline:
            raise TopicError(f"topic {topic!r} not grown to {partitions} partitions after {timeout:.0f}s")
        time.sleep(_POLL_INTERVAL_S)


def committed_offsets(bootstrap_servers: str, group: str, topic: str, partitions: list[int],
                      client_config: dict | None = None, timeout: float = 10) -> dict[int, int]:
    """The group's committed offset of each partition (-1 where it has none), read with a client of
    its own that never joins the group (the worker compares them with its snapshots' at recovery)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap_servers, "group.id": group, "enable.auto.commit": False,
                         "logger": logging.getLogger(__name__ + ".librdkafka"), **(client_config or {})})
    try:
        answer = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=timeout)
    finally:
        consumer.close()
    return {tp.partition: tp.offset if tp.error is None and tp.offset >= 0 else -1 for tp in answer}


class GroupUnsettled(RuntimeError):
    """The consumer group is rebalancing: its members' assignments are not final."""


def member_partitions(bootstrap_servers: str, group: str, member_id: str, topic: str,
                      client_config: dict | None = None, timeout: float = 10) -> set[int] | None:
    """The partitions of ``topic`` the group's member ``member_id`` holds, as the group coordinator
    sees them; None if the group has no such member (it left, or was evicted). Raises
    :class:`GroupUnsettled` while the group rebalances, a ``KafkaException`` if it cannot be asked."""
    from confluent_kafka import ConsumerGroupState

    admin = AdminClient({"bootstrap.servers": bootstrap_servers,
                         "logger": logging.getLogger(__name__ + ".librdkafka"), **(client_config or {})})
    description = admin.describe_consumer_groups([group], request_timeout=timeout)[group].result(timeout=timeout)
    for member in description.members:
        if member.member_id == member_id:
            if description.state != ConsumerGroupState.STABLE:
                raise GroupUnsettled(f"group {group} is {description.state.name}")
            return {tp.partition for tp in member.assignment.topic_partitions if tp.topic == topic}
    return None
