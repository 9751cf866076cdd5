"""Adaptive micro-batches from a Faust stream: as large as the backlog, taken in bulk.

Faust's ``Stream.take_events(max_, within)`` yields a batch when it holds ``max_`` events or
when ``within`` seconds have passed, so below saturation every event waits for the timer. Here a
batch is yielded as soon as the events delivered so far are all in it:

- a batch starts with the first event waiting (or the next to arrive), takes every event already
  waiting in the stream's queue, and lingers ``linger_s`` (1 ms) for more, as long as more come;
- it is yielded when nothing more arrived during a linger, when it holds ``batch_max`` events, or
  when its first event has waited ``within_s`` (the cap of a batch's gathering time);
- so its size follows the load: one or a few events when the worker is idle (latency is the
  processing time plus the linger), growing with the backlog that builds up while the previous
  batch is being scored, up to ``batch_max`` under saturation (the model call amortised).

**In bulk.** Faust's stream iterator hands events over one at a time: per event it yields to the
event loop (``sleep(0)``, a whole loop iteration), awaits the queue, runs the stream's processors
(``take_events`` is one of them) and its sensors. Here the waiting events are taken from the
stream's queue in one synchronous sweep, doing per event only what that iterator does for the
consumer's sake: events fetched before the current rebalance (an older consumer generation), or
delivered while flow is suspended, are skipped, not handed over; the others are tracked as
unacknowledged by the consumer (a rebalance waits for them) and reported to Faust's sensors, if
any. Acks go the same way in bulk (:func:`ack_events`). Measured on the throughput benchmark's
worker (main thread CPU per event, same run): see ``benchmarks/results/fast_path.md``.

The next events are gathered while the consumer handles this batch all the same: the fetcher
delivers them to the stream's queue, bounded by ``stream_buffer_maxsize`` (Faust pauses fetching a
partition beyond 80 % of it). Stream processors (``stream.add_processor``), if any, are called
with each taken event's value after the sweep (their results are not used: batches hand over
events); the worker's stream has none.

The batch's events are acknowledged once the consumer asks for the next batch, i.e. after it has
finished with this one. With ``defer_acks`` the consumer acknowledges them itself
(:func:`ack_events`), later: the worker acks a batch only once the window snapshots covering it
are in the changelog, and writes those once a second rather than once per batch. With ``idle_s``
an empty batch is yielded after that long without events, so such deferred work still happens at
a batch boundary when the input goes quiet (and Faust's rebalance, which waits for every taken
event to be acked, is not held up). This relies on the stream, queue and consumer internals that
Faust's own iterator uses (faust-streaming is pinned in pyproject.toml).
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncGenerator, AsyncIterator, List

from faust.transport.consumer import Consumer
from faust.types import EventT
from faust.types.tuples import ConsumerMessage, Message, ack_lock
from mode.utils.futures import maybe_async, notify

LINGER_S = 0.001


def pending_events(stream: Any) -> int:
    """Events delivered to the stream's queue and not handed to the consumer yet."""
    queue = getattr(stream.channel, "queue", None)
    return queue.qsize() if queue is not None else 0


class _Taker:
    """Moves waiting events from a stream's queue into a batch, as Faust's stream iterator would."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.processors = stream._processors
        self.app = stream.app
        self.queue = stream.channel.queue
        self.consumer = self.app.consumer
        self.sensors = self.app.sensors

    async def take(self, batch: List[Any], limit: int) -> int:
        """Appends up to ``limit - len(batch)`` waiting events to ``batch`` (without waiting for
        more); how many."""
        before = len(batch)
        self._sweep(batch, limit)
        taken = len(batch) - before
        self.stream.events_total += taken
        if taken and self.processors:
            for event in batch[before:]:
                value = event.value
                for processor in self.processors:
                    value = await maybe_async(processor(value))
        return taken

    def _sweep(self, batch: List[Any], limit: int) -> None:
        queue = self.queue
        if queue.empty():
            if queue._errors:  # a channel error is raised to the consumer, as Faust's iterator does
                raise queue._errors.popleft()
            return
        app = self.app
        # Synchronous from here: flow and generation cannot change during the sweep.
        active = app.flow_control.is_active()
        generation = app.consumer_generation_id
        acking_topics = app.topics.acking_topics
        track = self.consumer.unacked.add
        has_sensors = bool(self.sensors._sensors)
        stream = self.stream
        get = queue.get_nowait
        qsize = queue.qsize
        append = batch.append
        while len(batch) < limit and qsize():
            event = get()
            if not isinstance(event, EventT):
                raise TypeError(f"bulk batches take events from a topic's stream, got {type(event).__name__}")
            message = event.message
            if not active or message.generation_id != generation:
                continue  # fetched for an earlier assignment: Faust's iterator skips it too (unacked)
            if message.topic in acking_topics and not message.tracked:
                message.tracked = True
                track(message)
                if has_sensors:
                    self.sensors.on_message_in(message.tp, message.offset, message)
            if has_sensors:
                self.sensors.on_stream_event_in(message.tp, message.offset, stream, event)
            append(event)

    async def wait(self, timeout: float) -> Any | None:
        """The next event to arrive (None after ``timeout``), taken off the queue."""
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None


async def take_adaptive(stream: Any, batch_max: int, within_s: float, linger_s: float = LINGER_S,
                        defer_acks: bool = False, idle_s: float | None = None) -> AsyncIterator[List[Any]]:
    """Yields lists of events (``faust.EventT``), acked once the next list is asked for (or, with
    ``defer_acks``, when the consumer calls :func:`ack_events`); ``[]`` after ``idle_s`` idle."""
    if batch_max < 1:
        raise ValueError("batch_max must be at least 1")
    taker = _Taker(stream)
    started_here = await stream.maybe_start()
    loop = asyncio.get_running_loop()
    idle_since = loop.time()
    try:
        while not stream.should_stop:
            batch: List[Any] = []
            await taker.take(batch, batch_max)
            if not batch:
                first = await taker.wait(min(idle_s or 1.0, 1.0))
                if first is None:
                    if idle_s is not None and loop.time() - idle_since >= idle_s:
                        idle_since = loop.time()
                        yield []
                    continue
                # The one event taken by waiting goes through the same sweep as the rest: put it back
                # at the head of the queue (nothing can have been queued before it since).
                taker.queue._queue.appendleft(first)
                await taker.take(batch, batch_max)
                if not batch:
                    continue  # it was stale
            started = loop.time()
            while len(batch) < batch_max and not stream.should_stop:
                left = within_s - (loop.time() - started)
                if left <= 0:
                    break
                await asyncio.sleep(min(linger_s, left))
                if not await taker.take(batch, batch_max):
                    break
            try:
                yield batch
            finally:
                if not defer_acks:
                    await ack_events(stream, batch)
                idle_since = loop.time()
    except StopAsyncIteration:  # the channel was ended (thrown in): so is the iteration, as in Faust's
        return
    finally:
        stream._channel_stop_iteration(stream.channel)
        if started_here:
            await stream.stop()
            stream.service_reset()


async def ack_events(stream: Any, events: List[Any]) -> None:
    """Acknowledges taken events: Faust may then commit their offsets (``Stream.ack``, in bulk)."""
    app = stream.app
    consumer = app.consumer
    sensors = app.sensors
    has_sensors = bool(sensors._sensors)
    if not has_sensors and _bulk_ack_applies(consumer):
        _ack_in_bulk(app, consumer, events)
        return
    with ack_lock:  # held once for the batch (it is re-entrant; each message's ack takes it too)
        for event in events:
            message = event.message
            final = message.ack(consumer)
            if has_sensors:
                sensors.on_stream_event_out(message.tp, message.offset, stream, event)
                if final:
                    sensors.on_message_out(message.tp, message.offset, message)


def _bulk_ack_applies(consumer: Any) -> bool:
    """True when Faust's own per-message ack path is in place (nothing overrides a step of it)."""
    return (type(consumer).ack is _CONSUMER_ACK and Message.ack is _MESSAGE_ACK
            and Message.decref is _MESSAGE_DECREF and ConsumerMessage.on_final_ack is _FINAL_ACK)


def _ack_in_bulk(app: Any, consumer: Any, events: List[Any]) -> None:
    """``Message.ack`` -> ``ConsumerMessage.on_final_ack`` -> ``Consumer.ack`` for each event,
    inlined: the same bookkeeping, with the locks taken and the ack waiters woken once per batch,
    and each topic's acking looked up once. Acks were 10 % of the event loop's samples under a
    backlog (py-spy); timed alone over 100,000 messages, 1.43 us per event through Faust's three
    calls, 0.58 us here. ``tests/test_fast_path.py`` pins that the bookkeeping is the same.
    """
    acks_enabled_for = app.topics.acks_enabled_for
    committed_offsets = consumer._committed_offset
    acked_indexes = consumer._acked_index
    acked_lists = consumer._acked
    unacked = consumer._unacked_messages
    enabled: dict[str, bool] = {}
    n_acked = 0
    with ack_lock:
        try:
            for event in events:
                message = event.message
                if message.acked:
                    continue
                refcount = message.refcount = max(message.refcount - 1, 0)
                if refcount:
                    continue  # another holder (a second stream) still has it
                if type(message).on_final_ack is not _FINAL_ACK:
                    message.on_final_ack(consumer)  # not a consumer message's (a plain Message's: the flag)
                    continue
                message.acked = True
                topic = message.topic
                acking = enabled.get(topic)
                if acking is None:
                    acking = enabled[topic] = acks_enabled_for(topic)
                if not acking:
                    continue
                tp = message.tp
                offset = message.offset
                committed = committed_offsets[tp]
                if committed is None or offset >= committed:
                    index = acked_indexes[tp]
                    if offset not in index:
                        unacked.discard(message)
                        index.add(offset)
                        acked_lists[tp].append(offset)
                        n_acked += 1
        finally:
            consumer._n_acked += n_acked
            if any(enabled.values()):  # Faust wakes its ack waiters after each final ack of an acking topic
                notify(consumer._waiting_for_ack)


_CONSUMER_ACK = Consumer.ack
_MESSAGE_ACK = Message.ack
_MESSAGE_DECREF = Message.decref
_FINAL_ACK = ConsumerMessage.on_final_ack


def adaptive_batches(stream: Any, batch_max: int, within_s: float, defer_acks: bool = False,
                     idle_s: float | None = None) -> AsyncGenerator[List[Any], None]:
    """:func:`take_adaptive`, registered with the stream so that stopping it closes the generator
    (as Faust does for ``take_events``)."""
    agen = take_adaptive(stream, batch_max, within_s, defer_acks=defer_acks, idle_s=idle_s)
    active = getattr(stream, "_active_agens", None)
    if active is not None:
        active.add(agen)
    return agen
