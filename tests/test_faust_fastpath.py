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


def _app(name: str, **settings):
    import time

    from stream_detector.kafka.faust_app import DetectorApp

    return DetectorApp(f"{name}-{time.time_ns()}", broker="kafka://127.0.0.1:9", store="memory://",
                       web_enabled=False, loghandlers=[], **settings)


class ProbeConsumer(faust_fastpath.FastConsumer):
    """The fast consumer with the broker fetch replaced by a count (the one step that needs a broker)."""

    fetched = 0

    async def _getmany(self, active_partitions, timeout):
        self.fetched += 1
        return {"records": True}


def _paused_consumer() -> ProbeConsumer:
    """A fast consumer whose two partitions are both paused for full stream buffers, as Faust pauses them."""
    from faust.types import TP

    app = _app("paused", consumer_fast_path=True)
    consumer = ProbeConsumer(app.transport, callback=app.topics.on_message,
                             on_partitions_revoked=lambda revoked: None,
                             on_partitions_assigned=lambda assigned: None)
    tps = {TP("input", 0), TP("input", 1)}
    consumer._set_active_tps(tps)
    for tp in tps:
        consumer.on_buffer_full(tp)
    assert consumer._get_active_partitions() == set() and consumer._buffered_partitions == tps
    return consumer


def test_a_paused_fetcher_fetches_as_soon_as_a_stream_buffer_drains_not_a_second_later():
    from faust.types import TP

    async def main():
        consumer = _paused_consumer()
        loop = asyncio.get_running_loop()
        started = loop.time()
        loop.call_later(0.05, consumer.on_buffer_drop, TP("input", 0))
        result = await consumer._wait_next_records(1.0)
        return loop.time() - started, result, consumer.fetched

    waited, result, fetched = run(main())
    assert 0.04 <= waited < 0.5  # Faust's own loop sleeps a full second here
    assert result == ({"records": True}, {TP("input", 0)}) and fetched == 1


def test_a_paused_fetcher_with_no_drain_returns_nothing_after_its_timeout():
    async def main():
        consumer = _paused_consumer()
        return await consumer._wait_next_records(0.05), consumer.fetched

    assert run(main()) == (({}, set()), 0)


def test_an_unpaused_fetcher_goes_straight_to_faust_fetch():
    from faust.types import TP

    async def main():
        consumer = _paused_consumer()
        for tp in (TP("input", 0), TP("input", 1)):
            consumer.on_buffer_drop(tp)
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await consumer._wait_next_records(1.0)
        return loop.time() - started, result, consumer.fetched

    waited, result, fetched = run(main())
    assert waited < 0.5 and result == ({"records": True}, {TP("input", 0), TP("input", 1)}) and fetched == 1


def test_the_fetch_wait_comes_from_the_app_settings_and_is_fausts_elsewhere():
    import faust

    async def main():
        apps = [_app("fetch-wait", consumer_fetch_max_wait_ms=20),
                _app("fetch-wait", consumer_fast_path=True, consumer_fetch_max_wait_ms=20),
                _app("fetch-wait"),
                faust.App("fetch-wait-plain", broker="kafka://127.0.0.1:9", store="memory://", web_enabled=False,
                          loghandlers=[])]
        waits = []
        for app in apps:
            consumer = app.consumer._thread._create_worker_consumer(app.transport)
            waits.append(consumer._fetch_max_wait_ms)
            await consumer.stop()
        return waits

    assert run(main()) == [20, 20, 1500, 1500]  # 1,500: Faust's own


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


def _direct_delivery_setup(schema, fast_path: bool = True):
    from faust.types import TP

    app = _app("direct", stream_buffer_maxsize=4, consumer_fast_path=fast_path)
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


def test_the_conductor_delivers_when_the_topic_decodes_faust_may_buffer_output_or_its_handler_map_is_being_updated():
    async def main():
        app, topic, tp = _direct_delivery_setup(None)
        assert faust_fastpath._direct_delivery(app.consumer, tp, {}) is None  # Faust decodes: its path
        # Faust's own producer buffer (fast path off): deliveries wait for it to drain, in the conductor.
        app, topic, tp = _direct_delivery_setup(faust_fastpath.RawEvents(), fast_path=False)
        assert faust_fastpath._direct_delivery(app.consumer, tp, {}) is None
        app, topic, tp = _direct_delivery_setup(faust_fastpath.RawEvents())
        async with app.topics._tp_to_callback_lock:
            assert faust_fastpath._direct_delivery(app.consumer, tp, {}) is None
        assert faust_fastpath._direct_delivery(app.consumer, tp, {}) is not None

    run(main())


def _commit_sequence(consumer_class: type, acks_per_step: int = 10) -> list[int]:
    """What a consumer commits, step by step, in the state a recovery leaves: offsets 473 to 478
    committed up to 473 and acked, a gap opened from the read offset 473 to the next record 479 (the
    seek moved the read offset back below records already delivered), then later records acked 10
    at a time with a commit after each step."""
    from faust.types import TP

    app = _app("gaps")
    consumer = consumer_class(app.transport, callback=app.topics.on_message,
                              on_partitions_revoked=lambda revoked: None,
                              on_partitions_assigned=lambda assigned: None)
    tp = TP("input", 2)
    consumer._committed_offset[tp] = 473

    def ack(offsets: range) -> None:
        for offset in offsets:
            if offset not in consumer._acked_index[tp]:
                consumer._acked_index[tp].add(offset)
                consumer._acked[tp].append(offset)

    ack(range(473, 479))
    asyncio.run(consumer._add_gap(tp, 474, 479))
    commits, offset = [], 479
    for _ in range(8):
        ack(range(offset, offset + acks_per_step))
        offset += acks_per_step
        new = consumer._new_offset(tp)
        if new is not None:
            consumer._committed_offset[tp] = new
            commits.append(new)
    return commits


def test_a_gap_over_offsets_already_acked_does_not_hold_commits_to_one_offset_a_step():
    assert _commit_sequence(faust_fastpath.Consumer) == [489, 499, 509, 519, 529, 539, 549, 559]
    assert _commit_sequence(faust_fastpath.FastConsumer)[0] == 489


def test_without_the_fix_fausts_gap_fill_duplicates_acked_offsets_and_commits_crawl():
    """What the fix is for: Faust's own consumer commits one offset a step past such a gap."""
    from faust.transport.drivers import aiokafka as faust_aiokafka

    assert _commit_sequence(faust_aiokafka.Consumer)[:4] == [475, 476, 477, 478]
