"""The consumer fast path: a delivery that does not wait costs no task; one that waits behaves as
Faust's own ``wait_first`` delivery (same results, exceptions, cancellation)."""

from __future__ import annotations

import asyncio

import pytest

from stream_detector.kafka import faust_fastpath
from stream_detector.kafka.faust_fastpath import start


def run(coro):
    return asyncio.run(coro)


def test_a_delivery_that_never_waits_finishes_inline_without_a_task():
    steps = []

    async def deliver():
        lock = asyncio.Lock()
        async with lock:  # uncontended: no suspension, like the conductor's lock
            steps.append("delivered")
        return 7

    async def main():
        tasks_before = len(asyncio.all_tasks())
        done, value = start(deliver())
        assert len(asyncio.all_tasks()) == tasks_before
        return done, value

    assert run(main()) == (True, 7)
    assert steps == ["delivered"]


def test_a_delivery_that_waits_resumes_where_it_stopped_with_the_awaited_values():
    async def deliver(gate: asyncio.Future, queue: asyncio.Queue):
        first = await gate
        await asyncio.sleep(0)  # a bare yield in between
        second = await queue.get()
        return first + second

    async def main():
        loop = asyncio.get_running_loop()
        gate, queue = loop.create_future(), asyncio.Queue()
        done, rest = start(deliver(gate, queue))
        assert not done
        task = asyncio.ensure_future(rest)
        await asyncio.sleep(0)
        assert not task.done()
        gate.set_result(40)
        await asyncio.sleep(0)
        queue.put_nowait(2)
        return await asyncio.wait_for(task, 1.0)

    assert run(main()) == 42


def test_an_error_after_waiting_reaches_the_caller():
    async def deliver(gate):
        await gate
        raise ValueError("bad event")

    async def main():
        gate = asyncio.get_running_loop().create_future()
        done, rest = start(deliver(gate))
        task = asyncio.ensure_future(rest)
        gate.set_result(None)
        with pytest.raises(ValueError, match="bad event"):
            await task

    run(main())


def test_an_error_thrown_into_a_waiting_delivery_can_be_handled_by_it():
    async def deliver(gate):
        try:
            await gate
        except KeyError:
            return "handled"
        return "not reached"

    async def main():
        gate = asyncio.get_running_loop().create_future()
        done, rest = start(deliver(gate))
        task = asyncio.ensure_future(rest)
        await asyncio.sleep(0)
        gate.set_exception(KeyError("k"))
        return await task

    assert run(main()) == "handled"


def test_cancelling_a_waiting_delivery_cancels_it_where_it_waits():
    cleaned = []

    async def deliver(gate):
        try:
            await gate
        finally:
            cleaned.append("finally ran")

    async def main():
        gate = asyncio.get_running_loop().create_future()
        done, rest = start(deliver(gate))
        task = asyncio.ensure_future(rest)
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return gate.cancelled()

    assert run(main()) is True  # the awaited future was cancelled, as a task running it would do
    assert cleaned == ["finally ran"]


def test_a_blocked_delivery_is_abandoned_when_flow_is_suspended_like_faust_does():
    """The rest goes through ``wait_first`` with the flow event, as Faust's own loop does."""
    from mode import Service

    class Consumer(Service):
        pass

    async def main():
        consumer = Consumer()
        suspend_flow = asyncio.Event()
        never = asyncio.get_running_loop().create_future()
        finished = []

        async def deliver():
            await never  # a full stream buffer
            finished.append(True)

        done, rest = start(deliver())
        assert not done
        waiting = asyncio.ensure_future(consumer.wait_first(rest, suspend_flow.wait()))
        await asyncio.sleep(0.01)
        suspend_flow.set()
        result = await asyncio.wait_for(waiting, 1.0)
        return result, finished, never.cancelled()

    result, finished, cancelled = run(main())
    assert not result.stopped and len(result.done) == 1  # the flow event won
    assert finished == [] and cancelled


def test_installs_only_on_the_pinned_faust_version_and_uninstalls_cleanly(monkeypatch):
    from faust.transport.consumer import Consumer

    original = Consumer._drain_messages
    faust_fastpath.uninstall()
    try:
        assert faust_fastpath.install() is True
        assert Consumer._drain_messages is not original
        assert Consumer._drain_messages.__wrapped__ is original
        assert faust_fastpath.install() is True  # idempotent
        faust_fastpath.uninstall()
        assert Consumer._drain_messages is original

        monkeypatch.setattr(faust_fastpath, "SUPPORTED_VERSIONS", ("0.0.0",))
        assert faust_fastpath.install() is False
        assert Consumer._drain_messages is original
    finally:
        faust_fastpath.uninstall()
        Consumer._drain_messages = original


class PausedConsumer:
    """The parts of Faust's consumer that the fetch wait reads: every partition paused (buffered)."""

    def __init__(self) -> None:
        self.flow_active = True
        self.app = type("App", (), {"client_only": False})()
        self._buffered_partitions = {"tp0", "tp1"}
        self._active: set = set()
        self.fetched = 0

    def _get_active_partitions(self) -> set:
        return self._active

    async def wait_for_stopped(self, event: asyncio.Event, timeout: float) -> bool:
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        return False


async def _original_wait_next_records(self, timeout):
    self.fetched += 1
    return {"records": True}, set(self._active)


def _original_on_buffer_drop(self, tp):
    self._buffered_partitions.discard(tp)
    self._active.add(tp)


def test_a_paused_fetcher_fetches_as_soon_as_a_stream_buffer_drains_not_a_second_later():
    wait_next = faust_fastpath._resumable_wait_next_records(_original_wait_next_records)
    on_drop = faust_fastpath._waking_on_buffer_drop(_original_on_buffer_drop)

    async def main():
        consumer = PausedConsumer()
        loop = asyncio.get_running_loop()
        started = loop.time()
        loop.call_later(0.05, on_drop, consumer, "tp0")
        result = await wait_next(consumer, 1.0)
        return loop.time() - started, result, consumer.fetched

    waited, result, fetched = run(main())
    assert 0.04 <= waited < 0.5  # Faust's own loop sleeps a full second here
    assert result == ({"records": True}, {"tp0"}) and fetched == 1


def test_a_paused_fetcher_with_no_drain_returns_nothing_after_its_timeout():
    wait_next = faust_fastpath._resumable_wait_next_records(_original_wait_next_records)

    async def main():
        consumer = PausedConsumer()
        return await wait_next(consumer, 0.05), consumer.fetched

    assert run(main()) == (({}, set()), 0)


def test_an_unpaused_fetcher_goes_straight_to_faust_fetch():
    wait_next = faust_fastpath._resumable_wait_next_records(_original_wait_next_records)

    async def main():
        consumer = PausedConsumer()
        consumer._buffered_partitions.clear()
        consumer._active = {"tp0"}
        return await wait_next(consumer, 1.0), consumer.fetched

    assert run(main()) == (({"records": True}, {"tp0"}), 1)


def test_fetch_max_wait_applies_to_the_configured_app_only():
    import faust

    async def main():
        apps = [faust.App(f"fetch-wait-{i}", broker="kafka://127.0.0.1:9", store="memory://",
                          web_enabled=False, loghandlers=[]) for i in range(2)]
        assert faust_fastpath.set_fetch_max_wait(apps[0], 20) is True
        waits = []
        for app in apps:
            consumer = app.consumer._thread._create_worker_consumer(app.transport)
            waits.append(consumer._fetch_max_wait_ms)
        return waits

    assert run(main()) == [20, 1500]  # 1,500: Faust's own


def test_raw_events_carry_the_message_bytes_undecoded_even_when_they_are_not_json():
    import time

    import faust
    from faust.types import TP
    from faust.types.tuples import Message

    app = faust.App(f"raw-events-{time.time_ns()}", store="memory://", web_enabled=False)
    topic = app.topic("input", key_serializer="raw", value_serializer="raw", schema=faust_fastpath.RawEvents())
    message = Message("input", 0, 7, 1.0, 0, [("h", b"1")], b"\xff key", b"{not json", None, tp=TP("input", 0))

    event = asyncio.run(topic.decode(message, propagate=True))
    assert event.message is message and event.key == b"\xff key" and event.value == b"{not json"
    assert event.headers == {"h": b"1"} and event.message.headers == [("h", b"1")]
    empty = Message("input", 0, 8, 1.0, 0, None, None, None, None, tp=TP("input", 0))
    event = asyncio.run(topic.decode(empty, propagate=True))
    assert event.key is None and event.value is None and event.message is empty


def _direct_delivery_setup(schema):
    import time

    import faust
    from faust.types import TP

    app = faust.App(f"direct-{time.time_ns()}", store="memory://", web_enabled=False,
                    stream_buffer_maxsize=4)
    faust_fastpath.skip_unused_per_event_work(app)
    topic = app.topic("input", key_serializer="raw", value_serializer="raw", schema=schema)
    tp = TP("input", 0)
    app.topics._tp_index[tp].add(topic)
    app.topics._tp_to_callback[tp] = app.topics._build_handler(tp, app.topics._tp_index[tp])
    return app, topic, tp


def test_a_raw_events_partition_is_delivered_straight_to_its_queue_with_the_reference_counted():
    from faust.types.tuples import Message

    async def main():
        app, topic, tp = _direct_delivery_setup(faust_fastpath.RawEvents())
        deliver = faust_fastpath._direct_delivery(app.consumer, tp, {})
        assert deliver is not None
        message = Message("input", 0, 7, 1.0, 0, [], b"k", b"v", None, tp=tp)
        assert deliver(message)
        event = topic.queue.get_nowait()
        assert event.message is message and event.value == b"v" and message.refcount == 1
        for offset in range(5):  # a full queue is left to the conductor, which waits for room
            delivered = deliver(Message("input", 0, offset, 1.0, 0, [], b"k", b"v", None, tp=tp))
        assert not delivered and topic.queue.qsize() == 4

    run(main())


def test_the_conductor_delivers_when_the_topic_decodes_or_its_handler_map_is_being_updated():
    async def main():
        app, topic, tp = _direct_delivery_setup(None)
        assert faust_fastpath._direct_delivery(app.consumer, tp, {}) is None  # Faust decodes: its path
        app, topic, tp = _direct_delivery_setup(faust_fastpath.RawEvents())
        async with app.topics._tp_to_callback_lock:
            assert faust_fastpath._direct_delivery(app.consumer, tp, {}) is None
        assert faust_fastpath._direct_delivery(app.consumer, tp, {}) is not None

    run(main())
