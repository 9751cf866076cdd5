"""An open incident survives a restart or a rebalance, and is still closed when its key stays silent.

Keys are restored lazily (at their next event); one with an open incident is restored at recovery,
so the idle sweep sees it; and the sweep runs while the input is quiet, not only when a batch is judged.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import orjson

from stream_detector.detector import Detector
from stream_detector.incidents import AlertPolicy
from stream_detector.metrics import WorkerMetrics
from stream_detector.runtime.pipeline import BatchPipeline, PipelineConfig
from stream_detector.runtime.state import ChangelogState
from stream_detector.thresholds import GlobalThreshold

from test_alert_lifecycle import WINDOW, artifact, newest_a, rec_at  # noqa: F401 (fixture)
from test_pipeline_failures import FakeOutput

T0 = 1_767_225_600.0
IDLE = 30.0


def _detector(artifact, now: list[float]) -> Detector:
    return Detector(artifact, newest_a, clock=lambda: now[0], key_clock=lambda: now[0], threshold=GlobalThreshold(1.0),
                    alerting=AlertPolicy(min_windows=1, idle_close_s=IDLE))


def _changelog_after_an_open_incident(artifact, now: list[float]) -> tuple[dict[bytes, bytes], str]:
    """The changelog a worker leaves: key `hot` with an open incident, key `calm` without one."""
    first = _detector(artifact, now)
    decisions, _ = first.process([rec_at("hot", i, 0.5 if i < WINDOW else 2.0, i) for i in range(WINDOW + 1)])
    opened = [d.alert for d in decisions if d.alert is not None]
    assert [m["state"] for m in opened] == ["open"]
    first.process([rec_at("calm", i, 0.5, 100 + i) for i in range(WINDOW + 2)])
    changelog = {key.encode(): first.snapshot(key, slot) for key, slot in first.windows.drain_touched().items()}
    return changelog, opened[0]["incident_id"]


def test_a_key_with_an_open_incident_is_restored_at_recovery_and_closed_idle_if_it_stays_silent(artifact):
    now = [T0]
    changelog, incident = _changelog_after_an_open_incident(artifact, now)
    metrics = WorkerMetrics()
    second = _detector(artifact, now)
    state = ChangelogState(second, FakeOutput(), "changelog", metrics, 2, restore_source=lambda k: changelog.pop(k, None))
    assert state.restore_open_incidents(changelog.items()) == 1
    assert "hot" in second.windows.store and "calm" not in second.windows.store  # the calm key still waits for its next event
    assert b"calm" in changelog and b"hot" not in changelog
    now[0] += IDLE - 1
    assert second.sweep_idle() == 0
    now[0] += 2
    assert second.sweep_idle() == 1  # no event of `hot` since the restart
    closed = second.drain_closed()
    assert [(m["key"], m["incident_id"], m["incident"]["close_reason"]) for m in closed] == [("hot", incident, "idle")]
    assert "hot" in second.windows.touched  # written again: the closed incident does not come back


def test_a_snapshot_without_an_opened_incident_is_left_for_its_next_event(artifact):
    now = [T0]
    first = _detector(artifact, now)
    first.process([rec_at("k", i, 0.5, i) for i in range(WINDOW + 1)])
    (blob,) = (first.snapshot(key, slot) for key, slot in first.windows.drain_touched().items())
    assert not first.snapshot_has_open_incident(blob)
    assert not first.snapshot_has_open_incident(blob[:first.windows.store.snapshot_body_size] + b"\x02garbage")


class _Events:
    """Batches as the adaptive stream yields them: events, then empty batches while the input is quiet."""

    def __init__(self, events: list, quiet_batches: int, now: list[float], step: float) -> None:
        self.events, self.quiet_batches, self.now, self.step = events, quiet_batches, now, step

    async def __aiter__(self):
        yield self.events
        for _ in range(self.quiet_batches):
            await asyncio.sleep(0)
            self.now[0] += self.step
            yield []


def _event(key: str, i: int, score: float, offset: int) -> SimpleNamespace:
    record = rec_at(key, i, score, offset)
    return SimpleNamespace(message=SimpleNamespace(value=record.value, key=record.key, timestamp=record.timestamp,
                                                   partition=0, offset=offset, headers=(), tp=("in", 0)))


def test_incidents_are_closed_idle_while_the_input_is_quiet(artifact):
    now = [T0]
    detector = _detector(artifact, now)
    out = FakeOutput()
    metrics = WorkerMetrics()
    state = ChangelogState(detector, out, "changelog", metrics, 2)
    config = PipelineConfig("in", "alerts", "dlq", batch_max=64, state_flush_s=0)
    pipeline = BatchPipeline(config, detector, metrics, None, out, state)
    events = [_event("hot", i, 0.5 if i < WINDOW else 2.0, i) for i in range(WINDOW + 1)]
    acked: list[int] = []

    async def ack(batch: list) -> None:
        acked.extend(e.message.offset for e in batch)

    async def main() -> None:
        await pipeline.run(_Events(events, quiet_batches=4, now=now, step=IDLE / 2), lambda: 0, ack,
                           lambda: {("in", 0)})
    asyncio.run(main())
    states = [(m[1], orjson.loads(m[2])["state"]) for m in out.topic("alerts")]
    assert states == [(b"hot", "open"), (b"hot", "close")]
    (snapshot,) = [m for m in out.topic("changelog") if m[1] == b"hot"][-1:]
    assert not detector.snapshot_has_open_incident(snapshot[2])  # written after the close
    assert sorted(acked) == list(range(len(events)))


def test_a_step_of_the_wall_clock_closes_no_incident_idle(artifact):
    wall, mono = [T0], [1000.0]
    detector = Detector(artifact, newest_a, clock=lambda: wall[0], key_clock=lambda: mono[0],
                        threshold=GlobalThreshold(1.0), alerting=AlertPolicy(min_windows=1, idle_close_s=IDLE))
    detector.process([rec_at("hot", i, 0.5 if i < WINDOW else 2.0, i) for i in range(WINDOW + 1)])
    assert detector.incidents.open_count == 1
    for step in (25 * 3600.0, -3600.0):  # the wall clock stepped a day ahead, then an hour back
        wall[0] += step
        detector.process([rec_at("other", i, 0.1, 100 + i) for i in range(WINDOW)])
        assert detector.drain_closed() == [] and detector.incidents.open_count == 1
    mono[0] += IDLE + 1  # silent for the idle limit: closed
    assert detector.sweep_idle() == 1 and detector.drain_closed()[0]["incident"]["close_reason"] == "idle"
