"""The throughput options and fast paths: the scoring stride for hot keys, the all-numbers decoder
path, the window store's event-time rate (README: "Performance")."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from stream_detector.artifacts import load_artifact, save_artifact
from stream_detector.detector import Detector, RawRecord
from stream_detector.events import EventDecoder, Invalid, encode_event
from stream_detector.models import build_model
from stream_detector.preprocessing import ScalerParams
from stream_detector.profiles import FieldSpec, SensorProfile
from stream_detector.scoring import Scores
from stream_detector.settings import Settings
from stream_detector.thresholds import fit_quantile_threshold
from stream_detector.windows import WindowStore

WINDOW = 4
CHANNELS = ("a", "b", "c")
T0 = 1_767_225_600.0


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


def constant_scorer(windows: np.ndarray) -> Scores:
    return Scores(np.full(len(windows), 0.1, np.float32), np.zeros((len(windows), len(CHANNELS)), np.float32))


def record(key: str, i: int, gap_s: float, offset: int) -> RawRecord:
    data = encode_event(key, f"{key}-{i}", T0 + i * gap_s, {c: float(i) for c in CHANNELS})
    return RawRecord(data, key.encode(), T0, 0, offset)


def stream(keys_and_gaps: dict[str, float], n: int) -> list[RawRecord]:
    out, offset = [], 0
    for i in range(n):
        for key, gap in keys_and_gaps.items():
            out.append(record(key, i, gap, offset))
            offset += 1
    return out


def scored_ids(detector: Detector, records: list[RawRecord], batch: int = 7) -> list[str]:
    ids = []
    for start in range(0, len(records), batch):
        decisions, _ = detector.process(records[start:start + batch])
        ids += [d.event.event_id for d in decisions]
    return ids


def test_stride_scores_every_kth_window_of_hot_keys_only(artifact):
    # "hot": 10 events/s of event time; "calm": one event every 2 s. Threshold: 1 event/s.
    detector = Detector(artifact, constant_scorer, clock=lambda: T0, score_stride=3, hot_key_rate=1.0)
    ids = scored_ids(detector, stream({"hot": 0.1, "calm": 2.0}, 20))
    calm = [i for i in ids if i.startswith("calm")]
    hot = [i for i in ids if i.startswith("hot")]
    assert calm == [f"calm-{i}" for i in range(WINDOW - 1, 20)]  # every window of the calm key
    # The hot key's first full window, then every third one (count - W divisible by the stride).
    assert hot == [f"hot-{i}" for i in range(WINDOW - 1, 20, 3)]
    unscored = (20 - (WINDOW - 1)) - len(hot)
    assert detector.stats.unscored == unscored
    assert detector.stats.scored == len(ids)
    assert detector.stats.consumed == 40 == detector.stats.scored + unscored + detector.stats.warming_up


def test_unscored_events_still_enter_the_window(artifact):
    seen: list[np.ndarray] = []

    def recording(windows: np.ndarray) -> Scores:
        seen.append(windows.copy())
        return constant_scorer(windows)

    detector = Detector(artifact, recording, clock=lambda: T0, score_stride=2)  # hot_key_rate 0: every key
    detector.process(stream({"k": 1.0}, WINDOW + 2))
    windows = np.concatenate(seen)
    assert len(windows) == 2  # events W-1 and W+1 scored, W skipped
    np.testing.assert_array_equal(windows[-1][:, 0], np.arange(2, WINDOW + 2, dtype=np.float32))


def test_decisions_do_not_depend_on_batching_with_a_stride(artifact):
    records = stream({"a": 0.01, "b": 0.5, "c": 3.0}, 30)
    runs = []
    for batch in (1, 5, 90):
        detector = Detector(artifact, constant_scorer, clock=lambda: T0, score_stride=4, hot_key_rate=1.0)
        runs.append(scored_ids(detector, records, batch))
    assert runs[0] == runs[1] == runs[2]


def test_stride_one_scores_everything(artifact):
    detector = Detector(artifact, constant_scorer, clock=lambda: T0)
    ids = scored_ids(detector, stream({"hot": 0.001}, 12))
    assert len(ids) == 12 - (WINDOW - 1) and detector.stats.unscored == 0


def test_stride_settings_are_validated():
    assert Settings().score_stride == 1 and Settings().hot_key_rate == 0.0
    with pytest.raises(ValueError, match="score_stride"):
        Settings(score_stride=0)
    with pytest.raises(ValueError, match="hot_key_rate"):
        Settings(hot_key_rate=-1.0)


def test_window_store_follows_a_keys_event_time_rate():
    store = WindowStore(window=4, n_features=1)
    slot = store.slot("k", 0.0)
    assert store.events_per_s(slot) == 0.0  # unknown before a second event
    for i in range(40):
        store.observe_time(slot, 100.0 + 0.5 * i)
    assert store.events_per_s(slot) == pytest.approx(2.0)
    for i in range(40):
        store.observe_time(slot, 200.0 + 10.0 * i)
    assert store.events_per_s(slot) == pytest.approx(0.1, rel=0.01)
    assert not store.observe_time(slot, 0.0)  # out of order: ignored by the rate
    assert store.events_per_s(slot) == pytest.approx(0.1, rel=0.01)


NUMBERS = (FieldSpec("x"), FieldSpec("y"))


@pytest.mark.parametrize("fields,reason", [
    ({"x": 1.0}, "missing_field"),
    ({"x": 1.0, "y": None}, "missing_field"),
    ({"x": True, "y": 1.0}, "non_numeric"),
    ({"x": "1.5", "y": 1.0}, "non_numeric"),
    ({"x": 10**400, "y": 1.0}, "non_finite"),
    ({"x": 1e308, "y": 1e308}, None),  # each finite though their sum is not: accepted
])
def test_all_number_fast_path_gives_the_same_answers_as_the_checks(fields, reason):
    decoder = EventDecoder(NUMBERS)
    doc = {"key": "k", "event_id": "e", "timestamp": T0, "fields": fields}
    result = decoder.from_mapping(doc)
    if reason is None:
        assert not isinstance(result, Invalid) and result.values == (1e308, 1e308)
    else:
        assert isinstance(result, Invalid) and result.reason == reason


def test_all_number_fast_path_converts_ints_to_floats():
    event = EventDecoder(NUMBERS).decode(encode_event("k", "e", T0, {"x": 3, "y": 2.5}))
    assert event.values == (3.0, 2.5) and all(type(v) is float for v in event.values)
    assert not any(math.isnan(v) for v in event.values)


# --- adaptive micro-batches ---------------------------------------------------------------------

def run_agent(batches_of, feed) -> list[tuple[float, list[int]]]:
    """Runs a Faust agent (in memory) taking batches with ``batches_of(stream)`` while ``feed(agent)``
    puts values; returns (seconds since start, values) per batch."""
    import asyncio
    import time

    import faust

    app = faust.App(f"batching-test-{time.time_ns()}", store="memory://", web_enabled=False)
    out: list[tuple[float, list[int]]] = []
    started = time.perf_counter()

    @app.agent()
    async def agent(stream):
        async for events in batches_of(stream):
            out.append((time.perf_counter() - started, [e.value for e in events]))
            await asyncio.sleep(0.005)  # "scoring"

    async def main():
        async with agent.test_context() as running:
            await feed(running)

    asyncio.run(main())
    return out


def put_then_wait(agent, n: int, settle_s: float) -> None:
    """Runs a Faust agent (in memory): puts 0..n-1 at once, then lets it work ``settle_s`` seconds."""
    import asyncio

    async def main():
        async with agent.test_context() as running:
            for i in range(n):
                await running.put(i, wait=False)  # as the fetcher delivers: not waiting for each
            await asyncio.sleep(settle_s)

    asyncio.run(main())


def test_adaptive_batches_take_the_backlog_up_to_batch_max_and_do_not_wait_for_the_timer():
    import asyncio

    from stream_detector.batching import take_adaptive

    async def burst(agent):
        for i in range(40):
            await agent.put(i, wait=False)
        await asyncio.sleep(0.5)

    # A linger longer than the default 1 ms: on a loaded machine the puts themselves can be further
    # apart than that, and a batch then (rightly) ends early; what is pinned here is the size rule.
    out = run_agent(lambda stream: take_adaptive(stream, 16, within_s=5.0, linger_s=0.2), burst)
    assert [len(values) for _, values in out] == [16, 16, 8]
    assert [v for _, values in out for v in values] == list(range(40))  # every event once, in order
    assert out[-1][0] < 1.0  # the last, partial batch did not wait for the 5 s cap


def test_events_delivered_while_a_batch_is_handled_are_taken_together_by_the_next():
    import asyncio
    import time

    import faust

    from stream_detector.batching import adaptive_batches, pending_events

    app = faust.App(f"overlap-test-{time.time_ns()}", store="memory://", web_enabled=False)
    sizes: list[int] = []
    waiting_after_first: list[int] = []

    @app.agent()
    async def agent(stream):
        async for events in adaptive_batches(stream, 16, within_s=5.0):
            sizes.append(len(events))
            if len(sizes) == 1:
                await asyncio.sleep(0.2)  # "scoring" the first batch while the rest is delivered
                waiting_after_first.append(pending_events(stream))

    put_then_wait(agent, 60, settle_s=1.0)
    assert waiting_after_first == [44]  # delivered meanwhile, not blocked behind the batch in hand
    assert sizes == [16, 16, 16, 12]


def test_bulk_batches_skip_events_of_an_earlier_consumer_generation_and_track_the_rest():
    import asyncio
    import time

    import faust

    from stream_detector.batching import ack_events, take_adaptive

    app = faust.App(f"generation-test-{time.time_ns()}", store="memory://", web_enabled=False)
    seen: list[int] = []
    unacked_while_held: list[int] = []
    acked: list[bool] = []

    @app.agent()
    async def agent(stream):
        async for events in take_adaptive(stream, 64, within_s=5.0, linger_s=0.05, defer_acks=True):
            seen.extend(e.value for e in events)
            unacked_while_held.append(len(app.consumer.unacked))  # a rebalance waits for these
            await ack_events(stream, events)
            acked.extend(e.message.acked for e in events)

    async def main():
        async with agent.test_context() as running:
            stale = []
            for i in range(5):
                stale.append(await running.put(i, wait=False))
            for event in stale:
                event.message.generation_id = app.consumer_generation_id - 1  # fetched before a rebalance
            fresh = [await running.put(i, wait=False) for i in range(5, 12)]
            for event in stale + fresh:  # as for records from Kafka: acks tracked by the consumer
                event.message.tracked = False
            app.topics._acking_topics.add(stale[0].message.topic)
            deadline = time.monotonic() + 10.0  # a busy machine may take a while; done when all 7 are acked
            while len(acked) < 7 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # nothing more arrives (the stale ones are never handed over)

    asyncio.run(main())
    assert seen == list(range(5, 12))
    assert unacked_while_held == [7]  # the stale ones are not tracked: Faust never acks them either
    assert acked == [True] * 7


def test_adaptive_batches_hand_over_a_lone_event_at_once():
    import asyncio

    from stream_detector.batching import adaptive_batches

    async def trickle(agent):
        for i in range(3):
            await agent.put(i, wait=False)
            await asyncio.sleep(0.1)

    out = run_agent(lambda stream: adaptive_batches(stream, 1024, within_s=5.0), trickle)
    assert [values for _, values in out] == [[0], [1], [2]]
    assert out[0][0] < 0.09  # handed over before the next event arrived


def test_faust_take_events_waits_for_its_timer_below_batch_max():
    """The behaviour adaptive batches replace: a partial batch waits ``within`` seconds."""
    import asyncio

    async def trickle(agent):
        await agent.put(0)
        await asyncio.sleep(0.3)

    out = run_agent(lambda stream: stream.take_events(1024, within=2.0), trickle)
    assert not out or out[0][0] >= 0.3  # still waiting when the feed ended (flushed when the agent stops)


def test_deferred_acks_wait_for_the_consumer_and_idle_yields_give_it_a_batch_boundary():
    import time

    import faust

    from stream_detector.batching import ack_events, adaptive_batches

    app = faust.App(f"deferred-acks-{time.time_ns()}", store="memory://", web_enabled=False)
    seen: list[int] = []
    idle_yields = 0
    held: list = []
    acked_while_held: list[bool] = []
    acked_after: list[bool] = []

    @app.agent()
    async def agent(stream):
        nonlocal idle_yields
        async for events in adaptive_batches(stream, 8, within_s=5.0, defer_acks=True, idle_s=0.1):
            # The previous batches' events stay unacked until the consumer acks them.
            acked_while_held.extend(e.message.acked for e in held)
            if not events:
                idle_yields += 1
                await ack_events(stream, held)
                acked_after.extend(e.message.acked for e in held)
                held.clear()
                continue
            seen.extend(e.value for e in events)
            held.extend(events)

    put_then_wait(agent, 20, settle_s=0.5)
    assert seen == list(range(20))
    assert acked_while_held and not any(acked_while_held)
    assert len(acked_after) == 20 and all(acked_after)
    assert idle_yields >= 1
    assert not held  # the idle batch boundary acked everything


# --- inference thread -----------------------------------------------------------------------------

_THREADS_AFTER_SMALL_CALLS = """
import os, sys, torch
from concurrent.futures import ThreadPoolExecutor
from stream_detector.scoring import inference_executor, worker_threads
worker_threads(1)  # what the worker does on its main thread
executor = inference_executor(1) if sys.argv[1] == "inference_executor" else ThreadPoolExecutor(1)
lstm = torch.nn.LSTM(8, 64, batch_first=True)
def score():
    with torch.inference_mode():
        for _ in range(3):
            lstm(torch.randn(1, 32, 8))
executor.submit(lambda: None).result()
before = len(os.listdir("/proc/self/task"))
executor.submit(score).result()
print(len(os.listdir("/proc/self/task")) - before)
"""


def _threads_started_by_small_model_calls(kind: str) -> int:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _THREADS_AFTER_SMALL_CALLS, kind], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent)
    return int(out.stdout.strip().splitlines()[-1])


def test_the_inference_thread_runs_small_model_calls_on_itself_not_on_a_spinning_team():
    from stream_detector.scoring import available_cores

    if available_cores() < 2 or not Path("/proc/self/task").exists():
        pytest.skip("needs 2 cores and /proc")
    # A plain thread gets a team of one thread per core for the same calls (whose idle member spun a
    # core on the benchmark machine); the worker's inference thread stays alone.
    assert _threads_started_by_small_model_calls("plain") >= 1
    assert _threads_started_by_small_model_calls("inference_executor") == 0


def _ack_fixture(tag: str):
    """A Faust app's consumer (not started), and messages covering every branch of Faust's ack."""
    import time

    import faust
    from faust.types import TP
    from faust.types.tuples import ConsumerMessage, Message

    app = faust.App(f"bulk-ack-{tag}-{time.time_ns()}", store="memory://", web_enabled=False)
    app.topics._acking_topics.add("events")
    consumer = app.consumer
    tp0, tp1 = TP("events", 0), TP("events", 1)
    consumer._committed_offset[tp1] = 10  # below this offset a message is already committed

    class Event:
        def __init__(self, message):
            self.message = message

    def message(tp, offset, cls=ConsumerMessage, refcount=1):
        m = cls(tp.topic, tp.partition, offset, 0.0, 0, [], b"k", b"v", None, tp=tp)
        m.refcount = refcount
        consumer._unacked_messages.add(m)
        return m

    messages = [
        message(tp0, 0), message(tp0, 1), message(tp0, 3),  # a gap: acked offsets are not contiguous
        message(tp0, 1),  # the same offset again (re-delivered): counted once
        message(tp1, 9),  # already committed: no bookkeeping
        message(tp1, 10), message(tp1, 11, refcount=2),  # held twice: the first ack only decrements
        message(TP("other", 0), 5),  # a topic that is not acked
        message(tp0, 4, cls=Message),  # not a consumer message: only its flag
    ]
    messages[1].acked = True  # acked before: skipped
    return app, consumer, [Event(m) for m in messages]


def _ack_state(consumer, events):
    return (
        {tp: list(v) for tp, v in consumer._acked.items() if v},
        {tp: set(v) for tp, v in consumer._acked_index.items() if v},
        consumer._n_acked,
        sorted((m.tp, m.offset) for m in consumer._unacked_messages),
        [(e.message.acked, e.message.refcount) for e in events],
    )


def test_acks_in_bulk_keep_exactly_the_bookkeeping_of_fausts_per_message_acks():
    import asyncio

    from faust.types.tuples import ack_lock

    from stream_detector.batching import _bulk_ack_applies, ack_events

    app, consumer, events = _ack_fixture("bulk")
    assert _bulk_ack_applies(consumer)  # the worker's consumer takes the bulk path
    stream = type("Stream", (), {"app": app})()
    asyncio.run(ack_events(stream, events))
    asyncio.run(ack_events(stream, events))  # a second ack finishes the message held twice
    bulk = _ack_state(consumer, events)

    app, consumer, events = _ack_fixture("faust")
    for _ in range(2):
        with ack_lock:
            for event in events:
                event.message.ack(consumer)
    assert bulk == _ack_state(consumer, events)
    acked, _, n_acked, unacked, flags = bulk
    assert {tp.partition: offsets for tp, offsets in acked.items()} == {0: [0, 3, 1], 1: [10, 11]}
    assert n_acked == 5
    # still unacked: the one acked before, the plain message, the committed one, the other topic's
    assert [(tp.topic, offset) for tp, offset in unacked] == [("events", 1), ("events", 4), ("events", 9), ("other", 5)]
    assert flags == [(True, 0), (True, 1)] + [(True, 0)] * 7  # the one acked before was left as it was
