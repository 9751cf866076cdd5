"""The batch lifecycle's failure semantics, with a fake consumer and producer (no broker).

A failure at any stage of a micro-batch either stays with one message (decode, window: the
message is dead-lettered and the batch goes on) or stops the worker (score, judge, send alerts,
send snapshots, ack) before any offset at or after the failed batch is acked, and no batch is
ever judged twice.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson
import pytest
import torch

from stream_detector.artifacts import load_artifact, save_artifact
from stream_detector.detector import Detector
from stream_detector.errors import DECODE_FAILED, NON_FINITE_SCORE, WINDOW_FAILED, DeliveryError
from stream_detector.events import encode_event
from stream_detector.incidents import AlertPolicy
from stream_detector.metrics import WorkerMetrics
from stream_detector.models import build_model
from stream_detector.preprocessing import ScalerParams
from stream_detector.profiles import SensorProfile
from stream_detector.runtime.failures import EXIT_BATCH_FAILED, MODEL_ATTEMPTS, FailurePolicy
from stream_detector.runtime.pipeline import BatchPipeline, PipelineConfig
from stream_detector.runtime.state import ChangelogState
from stream_detector.scoring import Scores
from stream_detector.thresholds import GlobalThreshold, fit_quantile_threshold

WINDOW = 4
CHANNELS = ("a", "b", "c")
T0 = 1_767_225_600.0
BATCH = 8
KEYS = ("k0", "k1")
CHANGELOG = "windows-changelog"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = build_model("lstm_ae", {"n_features": len(CHANNELS), "window": WINDOW, "hidden": 8, "latent": 4})
    scaler = ScalerParams.fit(rng.normal(0.0, 1.0, (100, len(CHANNELS))))
    threshold = fit_quantile_threshold(rng.gamma(2.0, 1.0, 100), 0.99)
    root = tmp_path_factory.mktemp("model")
    save_artifact(root, model, SensorProfile(CHANNELS), scaler, threshold, version="20260101T000000Z-abcdef")
    return load_artifact(root)


class Stopped(Exception):
    """What the test's exit raises instead of ending the process."""


class FakeDeliveries:
    def __init__(self, out: "FakeOutput"):
        self.out = out
        self.messages: list[tuple[str, bytes | None, bytes | None, Any]] = []

    def __len__(self) -> int:
        return len(self.messages)

    def send(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None,
             headers: Any = None) -> None:
        if self.out.refuse_produce is not None and self.out.refuse_produce(topic):
            raise BufferError("queue full for good")
        self.messages.append((topic, key, value, headers))

    def wait(self) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()

        def resolve() -> None:
            refused = [m for m in self.messages
                       if self.out.refuse_delivery is not None and self.out.refuse_delivery(m[0])]
            if refused:
                future.set_exception(DeliveryError(f"delivery failed: {len(refused)} refused"))
            else:
                self.out.delivered.extend(self.messages)
                self.out.log.extend(f"delivered {m[0]}" for m in self.messages[:1])
                future.set_result(len(self.messages))

        if self.out.delay_s:
            asyncio.get_running_loop().call_later(self.out.delay_s, resolve)
        else:
            resolve()
        return future


class FakeOutput:
    """The output producer: every message 'delivered' when its group is awaited, unless refused."""

    max_message_bytes = 1_000_000

    def __init__(self) -> None:
        self.delivered: list[tuple[str, bytes | None, bytes | None, Any]] = []
        self.refuse_delivery = None  # topic -> bool
        self.refuse_produce = None
        self.delay_s = 0.0  # how long the broker takes to acknowledge a group
        self.log: list[str] = []

    def group(self) -> FakeDeliveries:
        return FakeDeliveries(self)

    def topic(self, name: str) -> list[tuple[str, bytes | None, bytes | None, Any]]:
        return [m for m in self.delivered if m[0] == name]


def _events(n: int, anomalous_from: int | None = None) -> list[SimpleNamespace]:
    out = []
    for offset in range(n):
        key = KEYS[offset % len(KEYS)]
        value = encode_event(key, f"e{offset}", T0 + offset, {c: float(offset % 5) for c in CHANNELS})
        out.append(SimpleNamespace(message=SimpleNamespace(value=value, key=key.encode(), timestamp=T0 + offset,
                                                           partition=0, offset=offset, headers=(), tp=("in", 0))))
    return out


class Harness:
    """A pipeline over a real detector (fake scorer), with a fake producer and consumer."""

    def __init__(self, artifact, score: float = 5.0, scorer=None, adaptive: bool = True,
                 state_min_events: int = 2) -> None:
        self.metrics = WorkerMetrics()
        self.scored_calls = 0
        self.detector = Detector(artifact, scorer=scorer or self._scorer(score), threshold=GlobalThreshold(1.0),
                                 alerting=AlertPolicy(min_windows=1, update_every=1), max_batch=BATCH)
        self.out = FakeOutput()
        self.state = ChangelogState(self.detector, self.out, CHANGELOG, self.metrics,
                                    state_min_events=state_min_events)
        self.exits: list[int] = []
        self.failures = FailurePolicy(exit=self._exit)
        config = PipelineConfig("in", "alerts", "dlq", scores_topic="scores", batch_max=BATCH, state_flush_s=0,
                                batch_adaptive=adaptive)
        self.pipeline = BatchPipeline(config, self.detector, self.metrics, None, self.out, self.state, self.failures)
        self.acked: list[int] = []
        self.ack_error_at: int | None = None  # fail the ack call of this many acks so far
        self.judged: Counter[str] = Counter()
        finish = self.detector.finish

        def counting_finish(batch, scores):
            self.judged.update(e.event_id for e in batch.events)
            return finish(batch, scores)

        self.detector.finish = counting_finish

    def _scorer(self, score: float):
        def scorer(windows: np.ndarray) -> Scores:
            self.scored_calls += 1
            n = len(windows)
            return Scores(np.full(n, score, dtype=np.float32), np.ones((n, len(CHANNELS)), dtype=np.float32))
        return scorer

    def _exit(self, status: int) -> None:
        self.exits.append(status)
        raise Stopped(status)

    async def _ack(self, events: list[Any]) -> None:
        if self.ack_error_at is not None and len(self.acked) >= self.ack_error_at:
            raise RuntimeError("commit bookkeeping broke")
        self.acked.extend(e.message.offset for e in events)

    def run(self, events: list[SimpleNamespace]) -> None:
        async def batches():
            for first in range(0, len(events), BATCH):
                self.out.log.append(f"batch {first // BATCH} taken")  # take_events acks the one before
                yield events[first:first + BATCH]
                await asyncio.sleep(0)  # the settler's task gets its turn, as between Faust's deliveries

        async def main() -> None:
            await self.pipeline.run(batches(), lambda: 0, self._ack, lambda: {("in", 0)})
        asyncio.run(main())

    def scored_ids(self) -> set[str]:
        return {orjson.loads(m[2])["event_id"] for m in self.out.topic("scores")}


def _assert_nothing_acked_from(harness: Harness, first_failed_offset: int) -> None:
    """Stopped with the failure status; the acked offsets are whole batches before the failed one,
    every one of them judged once with its score (and alerts) delivered."""
    # (The settler's task reports its failure at once, and the loop again at its next batch: a real
    # exit never returns from the first.)
    assert harness.exits and set(harness.exits) == {EXIT_BATCH_FAILED}
    assert harness.acked, "the batches before the failure are acked"
    assert sorted(harness.acked) == list(range(len(harness.acked)))  # a prefix: no gap is ever skipped
    assert len(harness.acked) % BATCH == 0 and max(harness.acked) < first_failed_offset
    judged_and_delivered = harness.scored_ids()
    for offset in harness.acked:
        if offset % len(KEYS) + len(KEYS) * (WINDOW - 1) <= offset:  # each key's first W-1 only fill windows
            assert f"e{offset}" in judged_and_delivered
    assert all(count == 1 for count in harness.judged.values()), "a batch was judged twice"


def test_without_failures_every_event_is_judged_once_and_acked(artifact):
    harness = Harness(artifact)
    events = _events(5 * BATCH)
    harness.run(events)
    assert harness.exits == []
    assert sorted(harness.acked) == list(range(len(events)))
    assert set(harness.judged) == {f"e{i}" for i in range(WINDOW * len(KEYS) - len(KEYS), len(events))}
    assert all(count == 1 for count in harness.judged.values())
    assert harness.out.topic("alerts") and harness.out.topic(CHANGELOG)


def test_a_decoder_exception_dead_letters_the_message_and_the_batch_goes_on(artifact):
    harness = Harness(artifact)
    decode = harness.detector.decoder.decode
    poison = b'{"x":' + b"[" * 1000

    def decode_or_raise(raw, record=None):
        if raw == poison:
            raise RecursionError("maximum recursion depth exceeded")
        return decode(raw, record)

    harness.detector.decoder.decode = decode_or_raise
    events = _events(3 * BATCH)
    events[10].message.value = poison
    harness.run(events)
    assert harness.exits == []
    assert sorted(harness.acked) == list(range(len(events)))
    dead = harness.out.topic("dlq")
    assert len(dead) == 1 and dead[0][2] == poison
    assert dict(dead[0][3])["x-dlq-reason"] == DECODE_FAILED.encode()
    assert dict(dead[0][3])["x-dlq-source"] == b"in:0:10"


def test_a_windowing_exception_dead_letters_the_message_and_the_batch_goes_on(artifact, monkeypatch):
    harness = Harness(artifact)
    profile = harness.detector.windows.profile
    featurize = profile.featurize

    def featurize_or_raise(values, timestamp, state, out):
        if timestamp == T0 + 13:
            raise FloatingPointError("profile bug")
        featurize(values, timestamp, state, out)

    monkeypatch.setattr(profile, "featurize", featurize_or_raise)  # the artifact's profile: shared
    events = _events(3 * BATCH)
    harness.run(events)
    assert harness.exits == []
    assert sorted(harness.acked) == list(range(len(events)))
    dead = harness.out.topic("dlq")
    assert [dict(d[3])["x-dlq-reason"] for d in dead] == [WINDOW_FAILED.encode()]
    assert dict(dead[0][3])["x-dlq-source"] == b"in:0:13"


def test_a_model_that_raises_is_retried_then_the_worker_stops_before_acking_the_batch(artifact):
    calls = []

    def scorer(windows):
        calls.append(len(windows))
        if len(calls) >= 3:  # the third batch's call, and every one after
            raise RuntimeError("CUDA out of memory")
        n = len(windows)
        return Scores(np.full(n, 5.0, dtype=np.float32), np.ones((n, len(CHANNELS)), dtype=np.float32))

    harness = Harness(artifact, scorer=scorer)
    events = _events(6 * BATCH)
    with pytest.raises(Stopped):
        harness.run(events)
    # batch 1 fills the windows (one call for the last events), so calls 2 and 3 are batches 2 and 3.
    assert len(calls) == 2 + MODEL_ATTEMPTS
    assert harness.failures.failure.stage == "score"
    assert harness.metrics.model_call_retries._value.get() == MODEL_ATTEMPTS - 1
    _assert_nothing_acked_from(harness, 2 * BATCH)


@pytest.mark.parametrize("stage", ["judge", "send_alerts", "send_snapshots", "ack"])
def test_a_batch_failure_stops_the_worker_before_any_later_offset_is_acked(artifact, stage):
    harness = Harness(artifact)
    failing_batch = 3  # 0-based: offsets 24..31
    first_failed = failing_batch * BATCH
    if stage == "judge":
        finish = harness.detector.finish

        def finish_or_raise(batch, scores):
            if any(e.event_id == f"e{first_failed}" for e in batch.events):
                raise ValueError("threshold bug")
            return finish(batch, scores)

        harness.detector.finish = finish_or_raise
    elif stage == "send_alerts":
        harness.out.refuse_delivery = lambda topic: topic == "alerts" and len(harness.out.topic("alerts")) >= 20
    elif stage == "send_snapshots":
        harness.out.refuse_delivery = lambda topic: topic == CHANGELOG and len(harness.out.topic(CHANGELOG)) >= 4
    else:
        harness.ack_error_at = first_failed
    events = _events(8 * BATCH)
    with pytest.raises(Stopped):
        harness.run(events)
    assert harness.failures.failure.stage == stage
    if stage in ("judge", "ack"):
        _assert_nothing_acked_from(harness, first_failed)
    else:  # the first batch whose delivery was refused is not acked, nor any after it
        _assert_nothing_acked_from(harness, len(events))
        assert len(harness.acked) < len(events)


def test_a_nan_score_is_dead_lettered_and_never_closes_an_incident(artifact):
    nan_from = 2 * BATCH

    def scorer(windows):
        n = len(windows)
        value = 5.0 if scorer.calls < 2 else float("nan")
        scorer.calls += 1
        return Scores(np.full(n, value, dtype=np.float32), np.ones((n, len(CHANNELS)), dtype=np.float32))
    scorer.calls = 0

    harness = Harness(artifact, scorer=scorer)
    events = _events(6 * BATCH)
    harness.run(events)
    assert harness.exits == []
    assert sorted(harness.acked) == list(range(len(events)))
    states = [orjson.loads(m[2])["state"] for m in harness.out.topic("alerts")]
    assert "open" in states and "close" not in states  # NaN is not calm
    dead = harness.out.topic("dlq")
    assert {dict(d[3])["x-dlq-reason"] for d in dead} == {NON_FINITE_SCORE.encode()}
    assert len(dead) == len(events) - nan_from
    assert harness.metrics.events_invalid.labels(reason=NON_FINITE_SCORE)._value.get() == len(dead)
    for message in harness.out.topic("scores"):  # no "score": null against the schema
        assert np.isfinite(orjson.loads(message[2])["score"])


def test_an_infinite_score_is_never_published_as_null(artifact):
    def scorer(windows):
        n = len(windows)
        return Scores(np.full(n, np.inf, dtype=np.float32), np.ones((n, len(CHANNELS)), dtype=np.float32))

    harness = Harness(artifact, scorer=scorer)
    harness.run(_events(3 * BATCH))
    assert harness.out.topic("alerts") == [] and harness.out.topic("scores") == []
    assert all(dict(d[3])["x-dlq-reason"] == NON_FINITE_SCORE.encode() for d in harness.out.topic("dlq"))


def test_a_batch_cancelled_while_being_judged_is_not_judged_again_at_the_clean_stop(artifact):
    """The cleanup after an interrupted batch must not judge it a second time (a blip would
    become an incident, and a close go out for an incident whose open never did), nor write
    snapshots covering its events (they are redelivered)."""
    import threading

    entered, release = threading.Event(), threading.Event()
    calls = []

    def scorer(windows):
        calls.append(len(windows))
        if len(calls) == 3:  # the third batch: hold the model until the task is cancelled
            entered.set()
            release.wait(10)
        n = len(windows)
        return Scores(np.full(n, 5.0, dtype=np.float32), np.ones((n, len(CHANNELS)), dtype=np.float32))

    harness = Harness(artifact, scorer=scorer)
    events = _events(5 * BATCH)

    async def main() -> None:
        async def batches():
            for first in range(0, len(events), BATCH):
                yield events[first:first + BATCH]
            await asyncio.Event().wait()  # the stream stays open until the task is cancelled

        task = asyncio.ensure_future(harness.pipeline.run(batches(), lambda: 0, harness._ack, lambda: {("in", 0)}))
        while not entered.is_set():
            await asyncio.sleep(0.005)
        task.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert harness.exits == []
    assert all(count == 1 for count in harness.judged.values())
    # Batch 3 (offsets 16..23, the model's third call) was interrupted: it is redelivered, not acked.
    assert sorted(harness.acked) == list(range(2 * BATCH))
    assert not any(f"e{i}" in harness.judged for i in range(2 * BATCH, 3 * BATCH))


def test_without_adaptive_batches_the_next_batch_is_taken_only_once_the_snapshots_are_written(artifact):
    """Faust's take_events acks a batch when the next is asked for: its snapshots must be durable by then."""
    harness = Harness(artifact, adaptive=False)
    harness.out.delay_s = 0.01
    harness.run(_events(4 * BATCH))
    log = [line for line in harness.out.log if line.startswith(("batch", f"delivered {CHANGELOG}"))]
    assert log == ["batch 0 taken", f"delivered {CHANGELOG}", "batch 1 taken", f"delivered {CHANGELOG}",
                   "batch 2 taken", f"delivered {CHANGELOG}", "batch 3 taken", f"delivered {CHANGELOG}"]


def test_without_adaptive_batches_a_refused_snapshot_stops_the_worker(artifact):
    harness = Harness(artifact, adaptive=False)
    harness.out.refuse_delivery = lambda topic: topic == CHANGELOG
    with pytest.raises(Stopped):
        harness.run(_events(4 * BATCH))
    assert harness.failures.failure.stage == "send_snapshots"
    assert "batch 1 taken" not in harness.out.log  # the failed batch is never acked by asking for the next
