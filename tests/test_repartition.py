"""key_partition_check=repartition without a broker: which events are forwarded to their window
key's partition of the repartition topic, how the forwarded ones are windowed when read back
(scores equal to a one-partition replay, redeliveries from either topic never appended twice,
also across a snapshot), and that an input offset is acked only once its forward is delivered."""

from __future__ import annotations

import asyncio
import zlib
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from stream_detector.detector import Detector, RawRecord
from stream_detector.events import Envelope, encode_event
from stream_detector.metrics import WorkerMetrics
from stream_detector.repartition import SOURCE_HEADER, KeyRouter, home_partition, murmur2
from stream_detector.runtime.failures import EXIT_BATCH_FAILED, FailurePolicy
from stream_detector.runtime.pipeline import BatchPipeline, PipelineConfig
from stream_detector.runtime.state import ChangelogState
from stream_detector.thresholds import GlobalThreshold
from stream_detector.windows import snapshot_position, snapshot_repartitioned_offset, without_position

from test_alert_lifecycle import WINDOW, artifact, newest_a  # noqa: F401 (fixture)
from test_pipeline_failures import FakeDeliveries, FakeOutput, Stopped

T0 = 1_767_225_600.0
PARTITIONS = 2
TOPIC = "in-repartition"


def _keys_at(partition: int, n: int = 3) -> list[str]:
    """Keys whose home partition (librdkafka's consistent partitioner) is ``partition``."""
    keys = [f"key-{i}" for i in range(100) if home_partition(f"key-{i}".encode(), PARTITIONS) == partition]
    return keys[:n]


HOME0, HOME1 = _keys_at(0), _keys_at(1)


def _value(key: str, i: int) -> bytes:
    return encode_event(key, f"{key}-{i}", T0 + i, {"a": 0.1 * (i % 7), "b": 0.01 * (i % 3), "c": 0.0})


def _record(key: str, i: int, partition: int, offset: int, record_key: bytes | None,
            repartitioned: bool = False) -> RawRecord:
    return RawRecord(_value(key, i), record_key, T0 + i, partition, offset, repartitioned=repartitioned)


def _detector(artifact, routed: bool = True) -> Detector:
    return Detector(artifact, newest_a, clock=lambda: T0, threshold=GlobalThreshold(1.0),
                    router=KeyRouter(TOPIC, PARTITIONS) if routed else None)


def test_murmur2_and_the_home_partitions_match_kafkas_partitioners():
    # Kafka's own test vectors (UtilsTest.testMurmur2).
    for text, hashed in [("21", -973932308), ("foobar", -790332482), ("a-little-bit-long-string", -985981536),
                         ("a-little-bit-longer-string", -1486304829), ("abc", 479470107),
                         ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971)]:
        assert murmur2(text.encode()) == hashed
    assert home_partition(b"abc", 7, "murmur2") == 479470107 % 7
    assert home_partition(b"foobar", 7, "murmur2") == (-790332482 & 0x7FFFFFFF) % 7
    assert home_partition(b"abc", 7) == zlib.crc32(b"abc") % 7
    with pytest.raises(ValueError):
        KeyRouter(TOPIC, PARTITIONS, "random")


def test_an_event_whose_record_key_is_null_or_another_key_is_forwarded_not_windowed(artifact):
    detector = _detector(artifact)
    key = HOME0[0]
    records = [_record(key, 0, 0, 0, None), _record(key, 1, 1, 0, None), _record(key, 2, 0, 1, b"customer-3")]
    decisions, batch = detector.process(records)
    assert decisions == [] and key not in detector.windows.store and batch.invalid == []
    assert batch.forward == [(r, key) for r in records]
    assert detector.stats.repartitioned == 3


def test_a_well_keyed_event_is_windowed_on_its_keys_partition_and_forwarded_from_another(artifact):
    detector = _detector(artifact)
    key = HOME1[0]
    _, batch = detector.process([_record(key, 0, 1, 0, key.encode())])
    assert batch.forward == [] and detector.windows.store.count(detector.windows.store.slot_of(key)) == 1
    stray = _record(key, 1, 0, 5, key.encode())  # a producer that chose the partition itself
    _, batch = detector.process([stray])
    assert batch.forward == [(stray, key)]
    assert detector.windows.store.count(detector.windows.store.slot_of(key)) == 1


def test_forwarded_events_read_back_score_as_a_one_partition_replay_and_redeliveries_are_not_appended(artifact):
    """A key with events both ways: well keyed ones on the input, null-keyed ones through the
    repartition topic (partition = the key's home). Scores equal those of the same events in the
    same order from one partition; a redelivery of either topic's records appends nothing."""
    key = HOME0[0]
    routed, replay = _detector(artifact), _detector(artifact, routed=False)
    n = 3 * WINDOW
    taken, expected_order = [], []
    in_offset = re_offset = 0
    for i in range(n):
        if i % 3 == 2:  # forwarded earlier, read back now from repartition partition 0
            taken.append(_record(key, i, 0, re_offset, key.encode(), repartitioned=True))
            re_offset += 1
        else:
            taken.append(_record(key, i, 0, in_offset, key.encode()))
            in_offset += 1
        expected_order.append(_record(key, i, 0, i, key.encode()))
    decisions, batch = routed.process(taken)
    expected, _ = replay.process(expected_order)
    assert batch.forward == [] and [d.score for d in decisions] == [d.score for d in expected]
    assert len(decisions) == n - WINDOW + 1
    # A kill -9 before the commits: both topics redeliver from their committed offsets.
    again, batch = routed.process(taken[WINDOW:])
    assert again == [] and batch.replayed == n - WINDOW


def test_both_positions_of_a_key_survive_its_snapshot(artifact):
    key = HOME1[0]
    first = _detector(artifact)
    records = [_record(key, 0, 1, 10, key.encode()), _record(key, 1, 1, 4, key.encode(), repartitioned=True)]
    first.process(records)
    store = first.windows.store
    blob = store.snapshot(store.slot_of(key))
    assert snapshot_position(blob) == (1, 10) and snapshot_repartitioned_offset(blob) == 4
    second = Detector(first.artifact, newest_a, clock=lambda: T0, threshold=GlobalThreshold(1.0),
                      router=KeyRouter(TOPIC, PARTITIONS), restore=lambda k: blob if k == key else None)
    _, batch = second.process(records)
    assert batch.replayed == 2
    _, batch = second.process([_record(key, 2, 1, 5, key.encode(), repartitioned=True)])
    assert batch.replayed == 0 and second.windows.store.count(second.windows.store.slot_of(key)) == 3


class RepartitionDeliveries(FakeDeliveries):
    def send(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None,
             headers: Any = None, timestamp_ms: int | None = None) -> None:
        super().send(topic, key, value, partition, headers)
        self.messages[-1] = (topic, key, value, (partition, headers, timestamp_ms))


class RepartitionOutput(FakeOutput):
    def group(self) -> RepartitionDeliveries:
        return RepartitionDeliveries(self)


def _message(key: str, i: int, offset: int, record_key: bytes | None, topic: str = "in") -> SimpleNamespace:
    return SimpleNamespace(message=SimpleNamespace(value=_value(key, i), key=record_key, timestamp=T0 + i,
                                                   partition=0, offset=offset, headers=[("trace", b"t-1")],
                                                   tp=(topic, 0), topic=topic))


def _pipeline(artifact, out: FakeOutput, exits: list[int]) -> BatchPipeline:
    metrics = WorkerMetrics()
    detector = _detector(artifact)
    state = ChangelogState(detector, out, "changelog", metrics, state_min_events=1)

    def stop(status: int) -> None:
        exits.append(status)
        raise Stopped(status)

    config = PipelineConfig("in", "alerts", "dlq", batch_max=4, state_flush_s=0, repartition_topic=TOPIC)
    return BatchPipeline(config, detector, metrics, None, out, state, FailurePolicy(exit=stop))


def _run(pipeline: BatchPipeline, events: list[SimpleNamespace], ack) -> None:
    async def batches():
        for first in range(0, len(events), 4):
            yield events[first:first + 4]
            await asyncio.sleep(0)

    async def main() -> None:
        await pipeline.run(batches(), lambda: 0, ack, lambda: {("in", 0), (TOPIC, 0)})

    asyncio.run(main())


def test_a_forwarded_events_offset_is_acked_only_once_the_broker_has_its_forward(artifact):
    out = RepartitionOutput()
    out.delay_s = 0.01
    exits: list[int] = []
    pipeline = _pipeline(artifact, out, exits)
    key = HOME0[0]
    events = [_message(key, i, i, None if i % 2 else key.encode()) for i in range(8)]
    forwarded_when_acked: list[tuple[int, bool]] = []

    async def ack(acked: list[Any]) -> None:
        delivered = {_forward_source(m) for m in out.topic(TOPIC)}
        forwarded_when_acked.extend((e.message.offset, f"in:0:{e.message.offset}" in delivered) for e in acked)

    _run(pipeline, events, ack)
    assert exits == [] and sorted(o for o, _ in forwarded_when_acked) == list(range(8))
    assert all(delivered for offset, delivered in forwarded_when_acked if offset % 2)
    forwards = out.topic(TOPIC)
    assert len(forwards) == 4 and pipeline.metrics.events_repartitioned._value.get() == 4
    for (topic, record_key, value, (partition, headers, timestamp_ms)), offset in zip(forwards, (1, 3, 5, 7)):
        assert record_key == key.encode() and partition == 0 and value == _value(key, offset)
        assert headers == [("trace", b"t-1"), (SOURCE_HEADER, f"in:0:{offset}".encode())]
        assert timestamp_ms == int((T0 + offset) * 1000)


def _forward_source(message: tuple) -> str:
    headers = dict(message[3][1])
    return headers[SOURCE_HEADER].decode()


def test_a_forward_the_broker_refuses_stops_the_worker_before_its_offset_is_acked(artifact):
    out = RepartitionOutput()
    out.refuse_delivery = lambda topic: topic == TOPIC
    exits: list[int] = []
    pipeline = _pipeline(artifact, out, exits)
    key = HOME0[0]
    events = [_message(key, i, i, key.encode()) for i in range(4)] + [_message(key, 4, 4, None)] + \
             [_message(key, i, i, key.encode()) for i in range(5, 12)]
    acked: list[int] = []

    async def ack(batch: list[Any]) -> None:
        acked.extend(e.message.offset for e in batch)

    with pytest.raises(Stopped):
        _run(pipeline, events, ack)
    assert exits and set(exits) == {EXIT_BATCH_FAILED}
    assert 4 not in acked and all(offset < 4 for offset in acked)


def test_events_read_back_from_the_repartition_topic_are_windowed_there_never_forwarded_again(artifact):
    out = RepartitionOutput()
    exits: list[int] = []
    pipeline = _pipeline(artifact, out, exits)
    key = HOME0[0]
    events = [_message(key, i, i, key.encode(), topic=TOPIC) for i in range(WINDOW)]
    for e in events:
        e.message.headers = [(SOURCE_HEADER, f"in:1:{100 + e.message.offset}".encode())]
    acked: list[int] = []

    async def ack(batch: list[Any]) -> None:
        acked.extend(e.message.offset for e in batch)

    _run(pipeline, events, ack)
    store = pipeline.detector.windows.store
    slot = store.slot_of(key)
    assert exits == [] and out.topic(TOPIC) == [] and store.count(slot) == WINDOW
    assert store.repartitioned_offset(slot) == WINDOW - 1 and sorted(acked) == list(range(WINDOW))


def test_a_forwarded_events_record_position_id_is_its_input_records(artifact):
    detector = Detector(artifact, newest_a, clock=lambda: T0, threshold=GlobalThreshold(1.0), topic="in",
                        envelope=Envelope(event_id_from="record_position"), router=KeyRouter(TOPIC, PARTITIONS))
    key = HOME0[0]
    value = orjson.dumps({"key": key, "timestamp": T0, "fields": {"a": 0.1, "b": 0.0, "c": 0.0}})
    direct = detector.decoder.decode(value, RawRecord(value, key.encode(), T0, 0, 7))
    forwarded = detector.decoder.decode(value, RawRecord(value, key.encode(), T0, 0, 3, repartitioned=True,
                                                         origin="in:1:42"))
    assert (direct.event_id, forwarded.event_id) == ("in:0:7", "in:1:42")


def _forwarded(key: str, i: int, offset: int, origin_partition: int, origin_offset: int) -> RawRecord:
    return RawRecord(_value(key, i), key.encode(), T0 + i, 0, offset, repartitioned=True,
                     origin=f"in:{origin_partition}:{origin_offset}", origin_partition=origin_partition,
                     origin_offset=origin_offset)


def test_a_duplicate_forward_after_a_crash_is_not_appended_again_also_after_a_restore(artifact):
    """kill -9 after a forward was acknowledged and before its input offset was committed: the
    input record is forwarded again, at a new offset of the repartition topic. The key took that
    input partition's event already, so the copy is a replay, never a second window entry."""
    key = HOME0[0]
    detector = _detector(artifact)
    originals = [_forwarded(key, 0, 0, 0, 5), _forwarded(key, 1, 1, 1, 3), _forwarded(key, 2, 2, 0, 6)]
    duplicates = [_forwarded(key, 0, 3, 0, 5), _forwarded(key, 2, 4, 0, 6), _forwarded(key, 1, 5, 1, 3)]
    _, batch = detector.process(originals + duplicates)
    store = detector.windows.store
    assert batch.replayed == 3 and store.count(store.slot_of(key)) == 3
    blob = store.snapshot(store.slot_of(key))
    restored = Detector(detector.artifact, newest_a, clock=lambda: T0, threshold=GlobalThreshold(1.0),
                        router=KeyRouter(TOPIC, PARTITIONS), restore=lambda k: blob if k == key else None)
    _, batch = restored.process([_forwarded(key, 2, 6, 0, 6), _forwarded(key, 3, 7, 0, 7)])
    assert batch.replayed == 1 and restored.windows.store.count(restored.windows.store.slot_of(key)) == 4


def test_a_dropped_position_forgets_the_forwarded_input_offsets_and_keeps_the_repartition_offset(artifact):
    """A group reset or a recreated input topic: the input's events are processed again, so their
    new forwards are windowed; the repartition topic's own records already taken stay replays."""
    key = HOME0[0]
    detector = _detector(artifact)
    detector.process([_record(key, 0, 0, 9, key.encode()), _forwarded(key, 1, 4, 1, 3)])
    store = detector.windows.store
    blob = without_position(store.snapshot(store.slot_of(key)))
    assert snapshot_position(blob) == (0, -1) and snapshot_repartitioned_offset(blob) == 4
    restored = Detector(detector.artifact, newest_a, clock=lambda: T0, threshold=GlobalThreshold(1.0),
                        router=KeyRouter(TOPIC, PARTITIONS), restore=lambda k: blob if k == key else None)
    _, batch = restored.process([_forwarded(key, 1, 4, 1, 3), _forwarded(key, 1, 9, 1, 3)])
    assert batch.replayed == 1 and restored.windows.store.count(restored.windows.store.slot_of(key)) == 3
