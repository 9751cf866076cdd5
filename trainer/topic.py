"""Training data from the input topic itself (``trainer train --from-topic TOPIC``).

Every partition is assigned (no consumer group is joined and nothing is committed), sought to the
first offset at or after ``since`` (Kafka's time index, ``offsets_for_times``; the beginning when
not given) and read up to the first offset at or after ``until``, or the high watermark the
partition had when the read began: the reader never waits for new data. Each record goes through
the worker's own decoder, built from the same settings (envelope, ``key_field``, size limit, future
limit, Schema Registry), with the record's key, timestamp, partition and offset passed as the worker
passes them, so what the trainer learns from is what the worker would score. Refused records are
counted by the decoder's reason codes, never silently dropped.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import orjson
from confluent_kafka import OFFSET_END, Consumer, KafkaError, KafkaException, TopicPartition

from stream_detector.detector import RawRecord
from stream_detector.events import Envelope, EventDecoder, Invalid, parse_timestamp
from stream_detector.feedback import Feedback
from stream_detector.profiles import Profile, SensorProfile, TransactionProfile
from stream_detector.settings import Settings

from .data import LoadedData


def parse_time_flag(text: str) -> float:
    """``--since``/``--until``: ISO-8601 (UTC when no offset is given) or epoch seconds, as epoch seconds."""
    value: Any = text.strip()
    try:
        value = float(value)
    except ValueError:
        pass
    ts = parse_timestamp(value)
    if ts is None:
        raise ValueError(f"unreadable time {text!r} (ISO-8601 or epoch seconds)")
    return ts


@dataclass
class TopicRead:
    """What was read: the data, plus where it came from (for the summary and the artifact's metadata)."""

    data: LoadedData
    records: int  # records read, refused ones included
    partitions: dict[int, tuple[int, int]] = field(default_factory=dict)  # partition -> [start, end) offsets
    alerted: int | None = None  # --exclude-alerted: events the served model alerted on
    verdicts: dict[str, int] | None = None  # --with-feedback: verdicts read and events relabelled
    unreviewed: set[str] = field(default_factory=set)  # --with-feedback: events of incidents without a verdict

    def describe(self) -> dict[str, Any]:
        out = self.data.describe()
        out["records_read"] = self.records
        out["partitions"] = {str(p): list(span) for p, span in sorted(self.partitions.items())}
        if self.alerted is not None:
            out["alerted_events_left_out"] = self.alerted
        if self.verdicts is not None:
            out["feedback"] = dict(self.verdicts)
        return out


def build_decoder(settings: Settings, profile: Profile, topic: str) -> Any:
    """The decoder the worker builds from these settings (stream_detector.worker), for ``topic``."""
    decoder: Any = EventDecoder(profile.fields, key_field=settings.key_field,
                                max_bytes=settings.max_message_bytes, max_future_s=settings.max_future_s,
                                envelope=settings.envelope(), topic=topic)
    if settings.schema_registry_url:  # framed values through the registry, the rest as JSON (as the worker)
        from stream_detector.schema_registry import RegistryValueDecoder, registry_client

        decoder = RegistryValueDecoder(decoder, registry_client(settings), topic,
                                       proto_client=registry_client(settings))
    return decoder


def _numeric_names(mapping: dict[str, Any], skip: set[str]) -> list[str]:
    return [k for k, v in mapping.items()
            if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)]


def sensor_channels(values: Sequence[bytes | None], envelope: Envelope) -> list[str]:
    """The numeric fields (at the envelope's ``fields_path``) of the first JSON record that has any."""
    path = [p for p in envelope.fields_path.split(".") if p]
    skip = set() if path else {envelope.key_path.split(".")[0], envelope.time_path.split(".")[0],
                               envelope.event_id_path.split(".")[0]}
    for raw in values:
        try:
            doc = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            continue
        for name in path:
            doc = doc.get(name) if isinstance(doc, dict) else None
        if isinstance(doc, dict):
            channels = _numeric_names(doc, skip)
            if channels:
                return channels
    raise ValueError("no record with numeric fields found; pass --fields")


def _seconds(msg: Any) -> float | None:
    kind, ms = msg.timestamp()
    return ms / 1000.0 if kind != 0 and ms is not None and ms >= 0 else None  # 0: TIMESTAMP_NOT_AVAILABLE


def read_records(bootstrap_servers: str, topic: str, since: float | None = None, until: float | None = None,
                 client_config: dict[str, Any] | None = None, timeout_s: float = 30.0,
                 ) -> tuple[list[RawRecord], dict[int, tuple[int, int]]]:
    """Raw records of every partition of ``topic`` from ``since`` to ``until`` (record timestamps,
    epoch seconds), in offset order per partition, and the offsets read per partition."""
    config = {"bootstrap.servers": bootstrap_servers, "group.id": f"stream-detector-trainer-{uuid.uuid4().hex[:8]}",
              "logger": logging.getLogger("trainer.topic.rdkafka"), **(client_config or {}),
              "enable.auto.commit": False, "enable.auto.offset.store": False, "enable.partition.eof": True}
    consumer = Consumer(config)
    try:
        metadata = consumer.list_topics(topic, timeout=timeout_s)
        described = metadata.topics.get(topic)
        if described is None or described.error is not None or not described.partitions:
            reason = described.error if described is not None and described.error else "no partitions"
            raise ValueError(f"topic {topic!r} cannot be read: {reason}")
        partitions = sorted(described.partitions)

        def offsets_at(ts: float | None) -> dict[int, int]:
            if ts is None:
                return {}
            found = consumer.offsets_for_times([TopicPartition(topic, p, int(ts * 1000)) for p in partitions],
                                               timeout=timeout_s)
            return {tp.partition: tp.offset for tp in found}  # -1 (OFFSET_END): no record at or after ts

        starts, ends = offsets_at(since), offsets_at(until)
        spans: dict[int, tuple[int, int]] = {}
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)
            start = starts.get(p, low)
            start = high if start in (OFFSET_END, -1) else max(start, low)
            end = ends.get(p, high)
            end = high if end in (OFFSET_END, -1) else min(end, high)
            spans[p] = (start, max(start, end))
        pending = {p for p, (start, end) in spans.items() if end > start}
        records: list[RawRecord] = []
        if pending:
            consumer.assign([TopicPartition(topic, p, spans[p][0]) for p in sorted(pending)])
        last_progress = time.monotonic()
        while pending:
            batch = consumer.consume(500, timeout=1.0)
            if not batch and time.monotonic() - last_progress > timeout_s:
                raise TimeoutError(f"no record from partition(s) {sorted(pending)} of {topic!r} for {timeout_s:.0f} s")
            for msg in batch:
                p = msg.partition()
                if msg.error() is not None:
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        pending.discard(p)
                        continue
                    raise KafkaException(msg.error())
                last_progress = time.monotonic()
                if p not in pending or msg.offset() >= spans[p][1]:
                    pending.discard(p)
                    continue
                records.append(RawRecord(msg.value(), msg.key(), _seconds(msg), p, msg.offset()))
                if msg.offset() >= spans[p][1] - 1:
                    pending.discard(p)
        return records, spans
    finally:
        consumer.close()


def read_topic(settings: Settings, topic: str, profile: str | Profile, since: float | None = None,
               until: float | None = None, fields: Sequence[str] | None = None, client_config: dict | None = None,
               timeout_s: float = 30.0) -> TopicRead:
    """The topic's events from ``since`` to ``until``, decoded as the worker decodes them, in timestamp
    order (so each key's events are in its time order); labels are all 0 (normal)."""
    records, spans = read_records(settings.bootstrap_servers, topic, since, until, client_config, timeout_s)
    if profile == "sensors":
        profile = SensorProfile(list(fields) if fields else sensor_channels([r.value for r in records],
                                                                             settings.envelope()))
    elif profile == "transactions":
        profile = TransactionProfile()
    elif not isinstance(profile, (SensorProfile, TransactionProfile)):
        raise ValueError(f"unknown profile {profile!r}")
    decoder = build_decoder(settings, profile, topic)
    rejected: Counter = Counter()
    keyed = []
    for seq, record in enumerate(records):
        decoded = decoder.decode(record.value, record)
        if isinstance(decoded, Invalid):
            rejected[decoded.reason] += 1
            continue
        keyed.append((decoded.timestamp, seq, decoded))
    keyed.sort(key=lambda item: (item[0], item[1]))  # stable timestamp order across keys, as for CSV
    events = [k[2] for k in keyed]
    data = LoadedData(events, [0] * len(events), profile, rejected, [f"kafka:{topic}"])
    return TopicRead(data, len(records), spans)


def read_json_records(bootstrap_servers: str, topic: str, since: float | None = None,
                      client_config: dict[str, Any] | None = None, timeout_s: float = 30.0,
                      ) -> tuple[list[tuple[float, dict[str, Any]]], int]:
    """Every JSON-object record of ``topic`` from ``since`` (record time) up to its end now, as
    ``(record time, object)`` in offset order per partition; also how many records were not JSON
    objects (tombstones included)."""
    records, _ = read_records(bootstrap_servers, topic, since, client_config=client_config, timeout_s=timeout_s)
    out: list[tuple[float, dict[str, Any]]] = []
    unreadable = 0
    for record in records:
        try:
            doc = orjson.loads(record.value) if record.value else None
        except orjson.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict):
            unreadable += 1
            continue
        out.append((record.timestamp if record.timestamp is not None else 0.0, doc))
    return out, unreadable


def topic_exists(bootstrap_servers: str, topic: str, client_config: dict[str, Any] | None = None,
                 timeout_s: float = 10.0) -> bool:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap_servers, **(client_config or {})})
    described = admin.list_topics(topic, timeout=timeout_s).topics.get(topic)
    return described is not None and described.error is None and bool(described.partitions)


def alerted_event_ids(bootstrap_servers: str, alerts_topic: str, client_config: dict[str, Any] | None = None,
                      timeout_s: float = 30.0) -> tuple[set[str], int, int]:
    """The ``event_ids`` of every open/update/close message on the alerts topic (up to its end now):
    the events whose windows the served model alerted on. Also the messages read and those unreadable."""
    docs, not_json = read_json_records(bootstrap_servers, alerts_topic, client_config=client_config,
                                       timeout_s=timeout_s)
    ids: set[str] = set()
    unreadable = not_json  # tombstones and records that are not JSON objects
    for _, doc in docs:
        listed = doc.get("event_ids")
        if not isinstance(listed, list):
            unreadable += 1  # a message not in the alert schema: named in the summary
            continue
        ids.update(i for i in listed if isinstance(i, str))
    return ids, len(docs) + not_json, unreadable


def read_verdicts(bootstrap_servers: str, feedback_topic: str, client_config: dict[str, Any] | None = None,
                  timeout_s: float = 30.0) -> tuple[dict[str, "Feedback"], int]:
    """The latest verdict of every incident on the feedback topic, and how many messages were not
    valid verdicts (the worker dead-letters those; here they are only counted). A topic that does not
    exist yet (nobody gave a verdict) holds none."""
    from stream_detector.feedback import InvalidFeedback, parse_feedback

    if not topic_exists(bootstrap_servers, feedback_topic, client_config, timeout_s):
        return {}, 0
    records, _ = read_records(bootstrap_servers, feedback_topic, client_config=client_config, timeout_s=timeout_s)
    verdicts: dict[str, Feedback] = {}
    invalid = 0
    for record in records:
        try:
            feedback = parse_feedback(record.value, record.key)
        except InvalidFeedback:
            invalid += 1
            continue
        verdicts[feedback.incident_id] = feedback
    return verdicts, invalid
