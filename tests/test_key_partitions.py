"""With key_partition_check=dead_letter, no key's window is ever split between partitions: an event
whose record key is not its window key, or that comes from another partition than its key's
earlier events, is dead-lettered as `key_partition_mismatch`; the others are scored as a
one-partition replay scores them."""

from __future__ import annotations

import pytest

from stream_detector.detector import Detector, RawRecord
from stream_detector.errors import KEY_PARTITION_MISMATCH
from stream_detector.events import encode_event
from stream_detector.settings import Settings
from stream_detector.thresholds import GlobalThreshold

from test_alert_lifecycle import WINDOW, artifact, newest_a  # noqa: F401 (fixture)

T0 = 1_767_225_600.0


def _record(key: str, i: int, partition: int, offset: int, record_key: bytes | None) -> RawRecord:
    value = encode_event(key, f"{key}-{i}", T0 + i, {"a": 0.1 * (i % 7), "b": 0.0, "c": 0.0})
    return RawRecord(value, record_key, T0 + i, partition, offset)


def _detector(artifact, check: bool) -> Detector:
    return Detector(artifact, newest_a, clock=lambda: T0, threshold=GlobalThreshold(1.0), key_partition_check=check)


def test_events_with_null_record_keys_are_dead_lettered_never_windowed(artifact):
    detector = _detector(artifact, check=True)
    records = [_record("k", i, i % 2, i // 2, None) for i in range(4 * WINDOW)]  # round-robin, as a null key goes
    decisions, batch = detector.process(records)
    assert decisions == [] and "k" not in detector.windows.store
    assert [invalid.reason for _, invalid in batch.invalid] == [KEY_PARTITION_MISMATCH] * len(records)
    assert detector.stats.invalid[KEY_PARTITION_MISMATCH] == len(records)


def test_a_keys_event_on_another_partition_is_dead_lettered_and_its_window_stays_whole(artifact):
    checked = _detector(artifact, check=True)
    replay = _detector(artifact, check=True)  # the same key's events, all from one partition
    own = [_record("k", i, 0, i, b"k") for i in range(3 * WINDOW)]
    stray = [_record("k", 1000 + i, 1, i, b"k") for i in range(3)]  # a producer that partitioned it elsewhere
    mixed = own[:WINDOW] + stray + own[WINDOW:]
    decisions, batch = checked.process(mixed)
    expected, _ = replay.process(own)
    assert [d.score for d in decisions] == [d.score for d in expected]
    assert [r.offset for r, invalid in batch.invalid if invalid.reason == KEY_PARTITION_MISMATCH] == [0, 1, 2]


def test_a_record_keyed_otherwise_than_its_window_key_is_dead_lettered(artifact):
    detector = _detector(artifact, check=True)
    _, batch = detector.process([_record("terminal-7", 0, 0, 0, b"customer-3")])
    assert [invalid.reason for _, invalid in batch.invalid] == [KEY_PARTITION_MISMATCH]


def test_without_the_check_every_event_is_windowed_where_it_arrives(artifact):
    detector = _detector(artifact, check=False)
    records = [_record("k", i, i % 2, i // 2, None) for i in range(2 * WINDOW)]
    decisions, batch = detector.process(records)
    assert batch.invalid == [] and len(decisions) == WINDOW + 1


@pytest.mark.parametrize("value", ["off", "dead_letter", "repartition"])
def test_the_setting_takes_off_dead_letter_or_repartition(value):
    assert Settings(key_partition_check=value).key_partition_check == value
    with pytest.raises(ValueError, match="invalid settings"):
        Settings(key_partition_check="refuse")


def test_a_null_keyed_event_is_dead_lettered_even_on_its_keys_partition(artifact):
    detector = _detector(artifact, check=True)
    detector.process([_record("k", i, 0, i, b"k") for i in range(WINDOW)])
    _, batch = detector.process([_record("k", WINDOW, 0, WINDOW, None)])
    assert [invalid.reason for _, invalid in batch.invalid] == [KEY_PARTITION_MISMATCH]
    assert detector.windows.store.count(detector.windows.store.slot_of("k")) == WINDOW
