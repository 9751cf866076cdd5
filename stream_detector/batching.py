"""Adaptive micro-batches from a Faust stream: as large as the backlog, as soon as it is taken.

Faust's ``Stream.take_events(max_, within)`` yields a batch when it holds ``max_`` events or
when ``within`` seconds have passed, so below saturation every event waits for the timer. This
variant yields as soon as the events delivered so far are all in the batch:

- a batch starts with its first event, then takes every event already waiting in the stream's
  queue, lingering ``linger_s`` (1 ms) between looks;
- it is yielded when nothing is left waiting, when it holds ``batch_max`` events, or when its
  first event has waited ``within_s`` (the cap of a batch's gathering time);
- so its size follows the load: one or a few events when the worker is idle (latency is the
  processing time plus the linger), growing with the backlog that builds up while the previous
  batch is being scored, up to ``batch_max`` under saturation (the model call amortised).

Unlike Faust's ``take_events``, the next batches are gathered while the consumer handles this one:
the buffer is filled by a stream processor that blocks only once it holds ``ahead`` batches
(``ahead * batch_max`` events) not yet taken; the stream's bounded queue,
``stream_buffer_maxsize``, pauses fetching beyond that. Two batches ahead rather than one: with
one, the stream stood still once it was full, for most of each model call (measured: blocked 60 %
of the time under a backlog, the event loop idle 28 %), and then the consumer waited for the
next batch to fill. As there, the batch's events are
acknowledged only when the consumer asks for the next batch, i.e. after it has finished with this
one. It relies on the same ``Stream`` internals as ``take_events``
(faust-streaming is pinned in pyproject.toml).

With ``defer_acks`` the consumer acknowledges the events itself (:func:`ack_events`), later: the
worker acks a batch only once the window snapshots covering it are in the changelog, and writes
those once a second rather than once per batch. With ``idle_s`` an empty batch is yielded after
that long without events, so such deferred work still happens at a batch boundary when the
input goes quiet (and Faust's rebalance, which waits for every started event to be acked, is not
held up).
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any, AsyncGenerator, AsyncIterator, List


LINGER_S = 0.001
AHEAD = 2  # batches gathered ahead of the one being handled


def waiting_events(stream: Any) -> int:
    """Events delivered to the stream's queue and not taken yet."""
    queue = getattr(stream.channel, "queue", None)
    return queue.qsize() if queue is not None else 0


_gathering: "weakref.WeakKeyDictionary[Any, List[Any]]" = weakref.WeakKeyDictionary()


def pending_events(stream: Any) -> int:
    """Events delivered and not handed to the consumer yet: waiting in the stream's queue, or
    gathered into the next adaptive batch."""
    gathered = _gathering.get(stream)
    return waiting_events(stream) + (len(gathered) if gathered is not None else 0)


async def take_adaptive(stream: Any, batch_max: int, within_s: float, linger_s: float = LINGER_S,
                        defer_acks: bool = False, idle_s: float | None = None,
                        ahead: int = AHEAD) -> AsyncIterator[List[Any]]:
    """Yields lists of events (``faust.EventT``), acked once the next list is asked for (or, with
    ``defer_acks``, when the consumer calls :func:`ack_events`); ``[]`` after ``idle_s`` idle.

    While the consumer handles one list, the next are gathered (up to ``ahead * batch_max`` events,
    then the stream waits): Faust's per-event stream work overlaps the consumer's waits (model calls
    on another thread, broker acknowledgements) instead of following them.
    """
    if ahead < 1:
        raise ValueError("ahead must be at least 1")
    hold = ahead * batch_max
    events: List[Any] = []  # the events gathered and not taken yet, oldest first
    buffer_full = asyncio.Event()
    buffer_started = asyncio.Event()
    buffer_taken = asyncio.Event()
    stream_enable_acks: bool = stream.enable_acks
    channel_it = stream.channel.__aiter__()

    async def add_to_buffer(value: Any) -> Any:
        try:
            while len(events) >= hold:  # full and not taken yet: hold the stream here
                buffer_taken.clear()
                await stream.wait(buffer_taken)
                if stream.should_stop:
                    return value
            event = stream.current_event
            if event is None:
                raise RuntimeError("Take buffer found current_event is None")
            events.append(event)
            buffer_started.set()
            if len(events) >= batch_max:
                buffer_full.set()
        except asyncio.CancelledError:  # pragma: no cover
            raise
        except Exception as exc:
            stream.log.exception("Error adding to take buffer: %r", exc)
            await stream.crash(exc)
        return value

    stream.enable_acks = False  # events are acked here, after the consumer is done with them
    _gathering[stream] = events
    stream.add_processor(add_to_buffer)
    stream._enable_passive(channel_it)
    loop = asyncio.get_running_loop()
    idle_since = loop.time()
    try:
        while not stream.should_stop:
            await stream.wait_for_stopped(buffer_started, timeout=min(idle_s or 1.0, 1.0))
            if not events:
                if idle_s is not None and loop.time() - idle_since >= idle_s:
                    idle_since = loop.time()
                    yield []
                continue
            started = loop.time()
            while not buffer_full.is_set() and not stream.should_stop:
                left = within_s - (loop.time() - started)
                if left <= 0:
                    break
                await stream.wait_for_stopped(buffer_full, timeout=min(linger_s, left))
                if not waiting_events(stream):
                    break
            taken = events[:batch_max]
            del events[:batch_max]
            if len(events) < batch_max:
                buffer_full.clear()
            if not events:
                buffer_started.clear()
            buffer_taken.set()  # a stream held on a full buffer goes on gathering
            try:
                yield taken
            finally:
                if not defer_acks:
                    for event in taken:
                        await stream.ack(event)
                idle_since = loop.time()
    finally:
        stream.enable_acks = stream_enable_acks
        stream._processors.remove(add_to_buffer)
        _gathering.pop(stream, None)
        buffer_taken.set()


async def ack_events(stream: Any, events: List[Any]) -> None:
    """Acknowledges events taken with ``defer_acks``: Faust may then commit their offsets."""
    ack = stream.ack
    for event in events:
        await ack(event)


def adaptive_batches(stream: Any, batch_max: int, within_s: float, defer_acks: bool = False,
                     idle_s: float | None = None) -> AsyncGenerator[List[Any], None]:
    """:func:`take_adaptive`, registered with the stream so that stopping it closes the generator
    (as Faust does for ``take_events``)."""
    agen = take_adaptive(stream, batch_max, within_s, defer_acks=defer_acks, idle_s=idle_s)
    active = getattr(stream, "_active_agens", None)
    if active is not None:
        active.add(agen)
    return agen
