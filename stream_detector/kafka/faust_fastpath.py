"""Faust's consumer, made to keep up: delivery without tasks, no idle seconds, short fetch waits.

Three changes to faust-streaming's consumer, measured on the throughput benchmark's bare Faust
agent (one that only counts events, `benchmarks/variant_worker.py faust-ceiling`): ~10,700
events/s with Faust as it is, ~23,500 with all three (and the detector: 3,700 -> 5,400).

1. **Delivery.** Faust's fetcher (``Consumer._drain_messages``) hands every fetched record to the
   conductor with ``await self.wait_first(callback(message), self.suspend_flow.wait())``, which
   wraps the callback and three events (flow suspended, consumer stopped, consumer crashed) in four
   new tasks and an ``asyncio.wait``, so that a delivery blocked on a full stream buffer or on
   suspended flow can be abandoned. Almost every delivery completes without ever waiting (the
   conductor puts the event in the stream's queue with ``put_nowait``). So the loop below runs the
   callback's first step directly; when it finishes there no task is created at all. When it does
   have to wait, the rest of the same coroutine, resumed where it stopped, goes through
   ``wait_first`` exactly as before: abandoned when flow is suspended for a rebalance, or when the
   consumer stops or crashes. When flow is already suspended nothing changes.

   Going one step further, a partition read by one :class:`RawEvents` topic (the worker's input)
   skips the conductor altogether (:func:`_direct_delivery`): its records are counted, made into
   events and queued without the conductor's two coroutines, its lock and its flow-control and
   producer-buffer awaits, and the fetch's records are taken partition by partition (Faust goes
   round-robin between partitions record by record, and looks up each record's partition high
   watermark: here once per partition per fetch). Whenever a delivery could wait (flow suspended,
   a full queue, the handler map being updated) the record goes the conductor's way instead.
   Everything else in the loop is Faust 0.15's own.
2. **Paused partitions.** When a stream's buffer is 80 % full Faust stops fetching its partition
   until the buffer is down to 40 %; if every partition is paused its fetcher sleeps a whole second
   before looking again. The fetcher now wakes when a partition is resumed.
3. **Fetch wait** (:func:`set_fetch_max_wait`): see there.

Separately, :func:`skip_unused_per_event_work` drops two per-event steps (Faust's monitor sensor,
the producer-buffer check) that a worker producing nothing through Faust does not need, and
:class:`RawEvents` hands the worker the records' bytes without Faust's per-record decoding.

The stream buffer size (``stream_buffer_max``) matters as much: Faust's fetches return up to
1 MiB per partition (~12,000 events on the benchmark), and a buffer smaller than that pauses and
refetches on every fetch.

The patches touch Faust internals, so they are installed only on the faust-streaming version they
were written against (pinned in pyproject.toml), and the first two can be switched off
(``consumer_fast_path``).
"""

from __future__ import annotations

import asyncio
import logging
import types
import weakref
from typing import Any, Coroutine, Generator

import faust

log = logging.getLogger(__name__)

SUPPORTED_VERSIONS = ("0.15.3",)

_originals: dict[str, Any] = {}


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], pending: Any) -> Generator[Any, Any, Any]:
    """The rest of ``coro``, which has run up to yielding ``pending`` (what it waits for).

    A coroutine driven by hand yields what its awaits wait on (an asyncio future, or None for a
    bare yield); re-yielding that to the task that now runs it, and forwarding what the task sends
    or throws back, is exactly what the task would have done had it run the coroutine from the
    start.
    """
    while True:
        try:
            sent = yield pending
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # cancellation included: the coroutine sees it where it waits
            try:
                pending = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
            continue
        try:
            pending = coro.send(sent)
        except StopIteration as stop:
            return stop.value


def start(coro: Coroutine[Any, Any, Any]) -> tuple[bool, Any]:
    """Runs ``coro`` until it first waits: ``(True, result)`` when it finished without waiting,
    else ``(False, awaitable)`` for the rest of it."""
    try:
        pending = coro.send(None)
    except StopIteration as stop:
        return True, stop.value
    return False, _rest(coro, pending)


async def _rest(coro: Coroutine[Any, Any, Any], pending: Any) -> Any:
    # A native coroutine around the generator: Faust's wait_first accepts only Awaitables.
    return await _resume(coro, pending)


def _direct_delivery(consumer: Any, tp: Any, pressure: dict) -> Any:
    """A synchronous delivery of ``tp``'s records to its stream, or None where the conductor's is needed.

    The conductor delivers a record through two coroutines (its lock around the handler lookup,
    then the partition's handler: flow control, the producer-buffer check, the topic's decode,
    the queue). For a partition read by exactly one topic whose schema is :class:`RawEvents`, with
    Faust's producer buffer check gone (:func:`skip_unused_per_event_work`) and nobody updating
    the handler map, that comes down to: count the reference, make the event, queue it, with the
    same back-pressure callbacks. The caller falls back to the conductor whenever flow is
    suspended or the queue is full (a delivery that would wait).
    """
    app = consumer.app
    conductor = app.topics
    if conductor._tp_to_callback_lock.locked():
        return None
    if getattr(app.producer.buffer, "wait_until_ebb", None) is not _nothing_to_produce:
        return None
    channels = conductor._tp_index.get(tp)
    if not channels or len(channels) != 1:
        return None
    (channel,) = channels
    make_event = getattr(channel.decode, "event_class", None)
    if make_event is None:
        return None
    handler = conductor._tp_to_callback.get(tp)
    if hasattr(handler, "on_pressure_high") and hasattr(handler, "on_pressure_drop"):
        # Faust's compiled handler: its own callbacks (equal each time), so either path registers one.
        callbacks = (handler.on_pressure_high, handler.on_pressure_drop)
    else:
        callbacks = pressure.get(tp)
    if callbacks is None:  # the same two callables every time: the queue keeps them in a set
        on_topic_buffer_full, on_full, on_drop = (app.sensors.on_topic_buffer_full, consumer.on_buffer_full,
                                                  consumer.on_buffer_drop)

        def on_pressure_high() -> None:
            on_topic_buffer_full(tp)
            on_full(tp)

        def on_pressure_drop() -> None:
            on_drop(tp)

        callbacks = pressure[tp] = (on_pressure_high, on_pressure_drop)
    queue = channel.queue
    high, drop = callbacks
    full, put = queue.full, queue.put_nowait_enhanced

    def deliver(message: Any) -> bool:
        if full():
            return False
        message.refcount += 1  # as Faust's compiled handler counts it
        put(make_event(app, message.key, message.value, message.headers, message),
            on_pressure_high=high, on_pressure_drop=drop)
        return True

    return deliver


def _fast_drain_messages(original: Any) -> Any:
    from typing import cast

    from mode import Service

    from faust.transport.consumer import CONSUMER_FETCHING

    async def _drain_messages(self: Any, fetcher: Any) -> None:
        # Faust 0.15.3's Consumer._drain_messages with Consumer.getmany inlined; the delivery and the
        # per-partition steps differ (see the module docstring).
        callback = self.callback
        consumer_should_stop = cast(Service, self)._stopped.is_set
        fetcher_should_stop = cast(Service, fetcher)._stopped.is_set

        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        flag_consumer_fetching = CONSUMER_FETCHING
        set_flag = self.diag.set_flag
        unset_flag = self.diag.unset_flag
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for
        suspended = self.suspend_flow.is_set
        flow_control_active = self.app.flow_control.is_active
        to_message = self._to_message
        buffered = self._buffered_partitions
        track_end_offset = self.app.monitor.track_tp_end_offset
        pressure: dict = {}

        yield_every = 100
        sleep = asyncio.sleep

        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(flag_consumer_fetching)
                # Sleeping because sometimes getmany is called in a loop
                # never releasing to the event loop
                await self.sleep(0)
                if self.should_stop:
                    continue
                records, active_partitions = await self._wait_next_records(1.0)
                generation_id = self.app.consumer_generation_id
                if records is None or self.should_stop:
                    continue
                if not self.flow_active:
                    self.log.dev("getmany called while flow not active. Seek back to committed offsets.")
                    try:
                        await self.perform_seek()
                    except Exception as ex:
                        self.log.warning(f"exception performing seek when flow not active {ex}")
                    continue
                # Partition by partition (Faust goes round-robin between them record by record: the
                # order within a partition, the only one Kafka has, is the same).
                for tp, tp_records in records.items():
                    if not self.flow_active or self.app.consumer_generation_id != generation_id:
                        break
                    if not (active_partitions is None or tp in active_partitions or tp in buffered):
                        continue
                    track_end_offset(tp, self.highwater(tp))  # once per fetch, not per record
                    deliver = None
                    since_yield = 0
                    for record in tp_records:
                        since_yield += 1
                        if since_yield > yield_every:
                            await sleep(0)
                            since_yield = 0
                            deliver = None  # anything may have changed meanwhile
                            if not self.flow_active or self.app.consumer_generation_id != generation_id:
                                break
                            if not (active_partitions is None or tp in active_partitions or tp in buffered):
                                break
                        message = to_message(tp, record)
                        offset = message.offset
                        r_offset = get_read_offset(tp)
                        if r_offset is None or offset >= r_offset:
                            gap = offset - (r_offset or 0)
                            # We have a gap in income messages
                            if gap > 1 and r_offset:
                                acks_enabled = acks_enabled_for(message.topic)
                                if acks_enabled:
                                    await self._add_gap(tp, r_offset + 1, offset)
                                    deliver = None
                            if commit_every is not None:
                                if self._n_acked >= commit_every:
                                    self._n_acked = 0
                                    await self.commit()
                                    deliver = None
                            if suspended() or not flow_control_active():
                                deliver = None
                                await self.wait_first(callback(message), self.suspend_flow.wait())
                            else:
                                if deliver is None:
                                    deliver = _direct_delivery(self, tp, pressure) or _conductor
                                if deliver is _conductor or not deliver(message):
                                    done, rest = start(callback(message))
                                    if not done:
                                        deliver = None
                                        await self.wait_first(rest, self.suspend_flow.wait())
                            set_read_offset(tp, offset)
                        else:
                            self.log.dev(
                                "DROPPED MESSAGE ROFF %r: k=%r v=%r",
                                offset,
                                message.key,
                                message.value,
                            )
                unset_flag(flag_consumer_fetching)

        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                # we're already stopping so ignore
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                # we're already stopping so ignore
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            unset_flag(flag_consumer_fetching)

    _drain_messages.__doc__ = original.__doc__
    _drain_messages.__wrapped__ = original  # type: ignore[attr-defined]
    return _drain_messages


def _conductor(message: Any) -> bool:
    """Marks a partition whose records go through the conductor (see :func:`_direct_delivery`)."""
    return False


def _resumable_wait_next_records(original: Any) -> Any:
    async def _wait_next_records(self: Any, timeout: float) -> Any:
        # Faust sleeps a whole second when every partition is paused for a full stream buffer; wait
        # for one to be resumed instead (on_buffer_drop below), at most as long.
        if (self.flow_active and not self.app.client_only and self._buffered_partitions
                and not self._get_active_partitions()):
            resumed = _resumed(self)
            resumed.clear()
            await self.wait_for_stopped(resumed, timeout=timeout)
            if not self._get_active_partitions():
                return {}, set()
        return await original(self, timeout)

    _wait_next_records.__wrapped__ = original  # type: ignore[attr-defined]
    return _wait_next_records


def _waking_on_buffer_drop(original: Any) -> Any:
    def on_buffer_drop(self: Any, tp: Any) -> None:
        original(self, tp)
        _resumed(self).set()

    on_buffer_drop.__wrapped__ = original  # type: ignore[attr-defined]
    return on_buffer_drop


def _resumed(consumer: Any) -> asyncio.Event:
    event = consumer.__dict__.get("_fastpath_resumed")
    if event is None:
        event = consumer.__dict__["_fastpath_resumed"] = asyncio.Event()
    return event


def _supported(consequence: str) -> bool:
    """True on a faust-streaming version these patches were written against; else warns."""
    from importlib.metadata import version

    found = version("faust-streaming")
    if found in SUPPORTED_VERSIONS:
        return True
    log.warning("faust-streaming %s: %s (written for %s)", found, consequence, ", ".join(SUPPORTED_VERSIONS))
    return False


_PATCHES: dict[str, Any] = {
    "_drain_messages": _fast_drain_messages,
    "_wait_next_records": _resumable_wait_next_records,
    "on_buffer_drop": _waking_on_buffer_drop,
}


def install() -> bool:
    """Installs the fast delivery loop into Faust's consumer; False (and Faust's own loop) on a
    faust-streaming version it was not written against. Idempotent."""
    from faust.transport.consumer import Consumer

    if _originals:
        return True
    if not _supported("consumer fast path not installed"):
        return False
    for name, patch in _PATCHES.items():
        _originals[name] = getattr(Consumer, name)
        setattr(Consumer, name, patch(_originals[name]))
    return True


def uninstall() -> None:
    """Puts Faust's own consumer methods back."""
    from faust.transport.consumer import Consumer

    for name, original in _originals.items():
        setattr(Consumer, name, original)
    _originals.clear()


_fetch_wait_ms: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()


def set_fetch_max_wait(app: Any, wait_ms: int) -> bool:
    """Makes ``app``'s consumer ask the broker to hold fetches at most ``wait_ms`` (Faust: 1,500).

    aiokafka sends one fetch at a time per broker, for the partitions that have no fetched records
    waiting; when every partition with new data is waiting, the fetch holds only idle ones (such
    as Faust's leader topic) and the broker keeps it until ``wait_ms`` passes, while the waiting
    partitions, once drained, cannot be fetched. Faust hard-codes the wait when it creates the
    consumer, so that step is wrapped; False on a faust-streaming version it was not written for.
    """
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    if not _supported("fetch_max_wait_ms not applied"):
        return False
    create = AIOKafkaConsumerThread._create_worker_consumer
    if not hasattr(create, "__wrapped__"):
        def _create_worker_consumer(self: Any, transport: Any) -> Any:
            consumer = create(self, transport)
            wait_ms = _fetch_wait_ms.get(self.app)
            if wait_ms is not None:
                consumer._fetch_max_wait_ms = wait_ms  # read by AIOKafkaConsumer.start()
            return consumer

        _create_worker_consumer.__wrapped__ = create  # type: ignore[attr-defined]
        AIOKafkaConsumerThread._create_worker_consumer = _create_worker_consumer
    _fetch_wait_ms[app] = wait_ms
    return True


async def _nothing_to_produce() -> None:
    return None


def skip_unused_per_event_work(app: Any) -> bool:
    """Drops two per-event steps of Faust's that a worker producing nothing through Faust and
    serving no Faust web views does not need; False (nothing changed) on another faust-streaming.

    - Faust's ``Monitor`` sensor, fed four times per event (record in, stream in and out, acked)
      for the statistics of Faust's web views. It stays the app's monitor (commits and end offsets
      still reach it); only the per-event calls go.
    - The check, per delivered record, that Faust's producer buffer is not over its limit: output
      goes through :mod:`stream_detector.kafka.output`, so that buffer stays empty.

    Call before the app starts: the conductor reads the producer check when it builds its handlers.
    """
    if not _supported("per-event monitor and producer checks kept"):
        return False
    init_dependencies = app.on_init_dependencies

    def on_init_dependencies() -> Any:
        services = init_dependencies()  # adds the monitor to the sensors
        app.sensors.remove(app.monitor)
        return services

    app.on_init_dependencies = on_init_dependencies
    app.producer.buffer.wait_until_ebb = _nothing_to_produce
    return True


class RawEvents(faust.Schema):
    """The input topic's schema: each event carries its message's key and value bytes untouched.

    The worker decodes and validates ``event.message.value`` itself (invalid input goes to the dead
    letter topic with its reason), so Faust's per-record key and value decoding (serializer
    registry, codec lookup, model reconstruction, about 7 % of the event loop under a backlog) is
    work thrown away. A public extension point (``Schema.compile``), not a patch.
    """

    def compile(self, app: Any, *, on_key_decode_error: Any = None, on_value_decode_error: Any = None,
                default_propagate: bool = False) -> Any:
        # The event class, looked up once: `app.create_event` reads it from the settings registry
        # per record (1.98 us against 0.38 us for the bare constructor, measured).
        event_class = app.conf.Event

        async def decode(message: Any, *, propagate: bool = default_propagate) -> Any:
            return event_class(app, message.key, message.value, message.headers, message)

        decode.event_class = event_class  # type: ignore[attr-defined]  # for the fetcher's direct delivery
        return decode
