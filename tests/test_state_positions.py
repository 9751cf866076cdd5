"""Snapshot positions are trusted for the replay check only while the group's committed offset has
not gone back below the floor their partition's snapshots were written at (group reset to earliest,
input topic recreated): then every event is processed again, none taken for a replay."""

from __future__ import annotations

import asyncio

from stream_detector.detector import Detector
from stream_detector.metrics import WorkerMetrics
from stream_detector.runtime.state import ChangelogState, floor_key
from stream_detector.thresholds import GlobalThreshold
from stream_detector.windows import snapshot_position, with_offset

from test_alert_lifecycle import WINDOW, artifact, newest_a, rec_at  # noqa: F401 (fixture)
from test_pipeline_failures import FakeOutput

N = 200
COMMITTED = 150  # the group's committed offset when the snapshots were written




def _write_state(artifact) -> dict[bytes, bytes]:
    detector = Detector(artifact, newest_a, threshold=GlobalThreshold(1.0))
    out = FakeOutput()
    state = ChangelogState(detector, out, "changelog", WorkerMetrics(), 2, committed=lambda partition: COMMITTED)
    detector.process([rec_at("k", i, 0.5, i) for i in range(N)])

    async def flush() -> None:
        await state.send(state.collect_snapshots())
    asyncio.run(flush())
    changelog = {key: value for _, key, value, _ in out.topic("changelog")}
    assert floor_key(0) in changelog and b"k" in changelog
    return changelog


def _restarted(artifact, changelog: dict[bytes, bytes], committed_now: int):
    detector = Detector(artifact, newest_a, threshold=GlobalThreshold(1.0))
    out = FakeOutput()
    metrics = WorkerMetrics()
    state = ChangelogState(detector, out, "changelog", metrics, 2, restore_source=lambda k: changelog.pop(k, None))
    reset = asyncio.run(state.recover(changelog, {0: committed_now}))
    return detector, state, out, metrics, reset


def test_after_a_group_reset_to_earliest_every_event_of_a_restored_key_is_scored_again(artifact):
    changelog = _write_state(artifact)
    detector, _, out, metrics, reset = _restarted(artifact, changelog, committed_now=-1)  # reset: nothing committed
    assert reset == {0}
    decisions, batch = detector.process([rec_at("k", i, 0.5, i) for i in range(N)])
    assert batch.replayed == 0 and len(decisions) == N  # the restored window is full: every event scored
    assert metrics.positions_dropped._value.get() == 1
    # The new floor is written at once: a crash before the next commit is not taken for another reset.
    assert [(key, value) for _, key, value, _ in out.topic("changelog")] == [(floor_key(0), (-1).to_bytes(8, "little",
                                                                                                          signed=True))]


def test_after_a_crash_the_events_the_snapshot_holds_are_still_recognised_as_replayed(artifact):
    changelog = _write_state(artifact)
    detector, _, out, metrics, reset = _restarted(artifact, changelog, committed_now=COMMITTED)
    assert reset == set() and out.topic("changelog") == []
    decisions, batch = detector.process([rec_at("k", i, 0.5, i) for i in range(COMMITTED, N + 5)])
    assert batch.replayed == N - COMMITTED and len(decisions) == 5
    assert metrics.positions_dropped._value.get() == 0


def test_a_partition_committed_past_its_floor_keeps_its_positions(artifact):
    changelog = _write_state(artifact)
    detector, _, _, _, reset = _restarted(artifact, changelog, committed_now=N)
    assert reset == set()
    _, batch = detector.process([rec_at("k", N - 1, 0.5, N - 1)])
    assert batch.replayed == 1


def test_the_floor_follows_the_committed_offset_while_the_input_is_quiet(artifact):
    detector = Detector(artifact, newest_a, threshold=GlobalThreshold(1.0))
    out = FakeOutput()
    committed: list[int | None] = [None]  # a burst: its snapshots go out before anything is committed
    state = ChangelogState(detector, out, "changelog", WorkerMetrics(), 2, committed=lambda partition: committed[0])
    detector.process([rec_at("k", i, 0.5, i) for i in range(N)])

    async def flush() -> None:
        await state.send(state.collect_snapshots())
        assert state.collect_floors() is None
        committed[0] = N  # Faust commits the burst's offsets later
        floors = state.collect_floors()
        assert floors is not None and state.collect_floors() is None  # once
        await state.send(floors)
    asyncio.run(flush())
    assert out.topic("changelog")[-1][1:3] == (floor_key(0), N.to_bytes(8, "little", signed=True))


def test_a_snapshot_whose_position_is_past_its_partitions_end_loses_it_and_its_keys_events_are_scored(artifact):
    changelog = _write_state(artifact)
    # The key's snapshot names an offset the partition never reached (a garbled or foreign record):
    # trusted, it would take every event of the key for one its window holds, for ever.
    changelog[b"k"] = with_offset(changelog[b"k"], 10 ** 12)
    assert snapshot_position(changelog[b"k"]) == (0, 10 ** 12)
    detector = Detector(artifact, newest_a, threshold=GlobalThreshold(1.0))
    metrics = WorkerMetrics()
    state = ChangelogState(detector, FakeOutput(), "changelog", metrics, 2, restore_source=lambda k: changelog.pop(k, None))
    reset = asyncio.run(state.recover(changelog, {0: COMMITTED}, ends={0: N}))
    assert reset == set()
    decisions, batch = detector.process([rec_at("k", i, 0.5, i) for i in range(N, N + 5)])
    assert batch.replayed == 0 and len(decisions) == 5  # the window kept: scored at once
    assert metrics.positions_dropped._value.get() == 1


def test_a_garbage_snapshot_starts_its_key_cold_and_does_not_stop_the_recovery(artifact):
    changelog = _write_state(artifact)
    changelog[b"k"] = b"\x00garbage\xff" * 3
    detector = Detector(artifact, newest_a, threshold=GlobalThreshold(1.0))
    state = ChangelogState(detector, FakeOutput(), "changelog", WorkerMetrics(), 2,
                           restore_source=lambda k: changelog.pop(k, None))
    asyncio.run(state.recover(changelog, {0: COMMITTED}, ends={0: N}))
    assert state.restore_open_incidents(list(changelog.items())) == 0
    decisions, batch = detector.process([rec_at("k", i, 0.5, i) for i in range(N, N + WINDOW)])
    assert batch.warming_up == WINDOW - 1 and len(decisions) == 1 and detector.windows.restore_failures == 1


def test_a_keys_first_event_once_acked_is_in_the_changelog_so_the_next_owner_scores_the_keys_first_full_window(
        artifact):
    """Issue 21 (rolling restarts): with the default settings, an event is acked only once a
    snapshot holding it is written, even a key's very first one. Were a key with one event not
    written, its first event's offset would still be committed; the partition's next owner would
    start the key cold from its second event, and the key's W-th event (its first full window)
    would only warm the window up, never scored."""
    from stream_detector.detector import RawRecord
    from stream_detector.settings import Settings
    from test_pipeline_failures import CHANGELOG, KEYS, WINDOW as W, Harness, _events

    events = _events(len(KEYS) * W)  # each key's first W events, the keys in turn
    old = Harness(artifact, state_min_events=Settings().state_min_events)
    old.run(events[:len(KEYS)])  # each key's first event; then the partition moves
    assert old.exits == [] and sorted(old.acked) == list(range(len(KEYS)))
    changelog = {key: value for _, key, value, _ in old.out.topic(CHANGELOG)}

    new = Detector(artifact, newest_a, threshold=GlobalThreshold(1.0))
    ChangelogState(new, FakeOutput(), CHANGELOG, WorkerMetrics(), Settings().state_min_events,
                   restore_source=lambda key: changelog.pop(key, None))
    redelivered = [e.message for e in events[len(KEYS):]]  # from the committed offset on
    decisions, batch = new.process([RawRecord(m.value, m.key, m.timestamp, m.partition, m.offset)
                                    for m in redelivered])
    assert batch.replayed == 0
    assert sorted(d.event.event_id for d in decisions) == sorted(f"e{o}" for o in range(len(KEYS) * (W - 1),
                                                                                           len(KEYS) * W))
