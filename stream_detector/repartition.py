"""Repartitioning by the window key (``key_partition_check=repartition``), free of Kafka.

A key's window must live in one place: the worker that owns its partition. An event that reaches
the input topic elsewhere than its key's partition (a null or another record key, a ``key_field``
other than the record key, a producer that picks partitions itself) is forwarded, unchanged, to an
internal topic, keyed by its window key and written to the key's *home* partition; the worker
that owns input partition ``p`` owns partition ``p`` of that topic too (Faust's assignor
co-partitions the topics an app subscribes to that have as many partitions), so it windows the
forwarded event with the key's other events. As Faust's ``group_by`` and Kafka Streams'
repartition topics do; only the events that need it take the detour.

The home partition is the one a producer keying its records by the window key would pick, with
the partitioner named by ``repartition_partitioner``: ``consistent`` (CRC-32 of the key,
librdkafka's default for keyed records: confluent-kafka and every librdkafka client, the project's
own producer) or ``murmur2`` (Java clients, Kafka Streams, aiokafka and Faust). A partitioner other
than the producers' is no error, only a cost: their well keyed events then reach another partition
than their key's home and are forwarded as well (counted in ``events_repartitioned_total``).
"""

from __future__ import annotations

import zlib

PARTITIONERS = ("consistent", "murmur2")
SOURCE_HEADER = "x-repartition-source"  # topic:partition:offset of the forwarded event's input record


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash (``org.apache.kafka.common.utils.Utils.murmur2``), as a signed 32-bit int."""
    length = len(data)
    m, r = 0x5BD1E995, 24
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    end = length - length % 4
    for i in range(0, end, 4):
        k = data[i] | (data[i + 1] << 8) | (data[i + 2] << 16) | (data[i + 3] << 24)
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    rest = length % 4
    if rest == 3:
        h ^= data[end + 2] << 16
    if rest >= 2:
        h ^= data[end + 1] << 8
    if rest >= 1:
        h ^= data[end]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def home_partition(key: bytes, partitions: int, partitioner: str = "consistent") -> int:
    """The partition a producer keying its record by ``key`` writes it to, among ``partitions``."""
    if partitioner == "murmur2":
        return (murmur2(key) & 0x7FFFFFFF) % partitions  # Utils.toPositive(murmur2(key)) % n
    return zlib.crc32(key) % partitions  # librdkafka's rd_kafka_msg_partitioner_consistent


class KeyRouter:
    """Where each key's window lives: its home partition among ``partitions`` (the input topic's,
    and the repartition topic's), and the topic its misplaced events are forwarded to."""

    def __init__(self, topic: str, partitions: int, partitioner: str = "consistent"):
        if partitions < 1:
            raise ValueError("partitions must be at least 1")
        if partitioner not in PARTITIONERS:
            raise ValueError(f"partitioner must be one of {PARTITIONERS}, not {partitioner!r}")
        self.topic = topic
        self.partitions = partitions
        self.partitioner = partitioner

    def home(self, key: str) -> int:
        return home_partition(key.encode(), self.partitions, self.partitioner)
