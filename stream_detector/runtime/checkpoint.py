"""The checkpoint of the batch lifecycle: alerts, then window snapshots, then offsets, in batch order.

Like Quix Streams' Checkpoint: a batch's input offsets are acknowledged (Faust may commit them)
only once the broker has every alert and dead letter it caused, and then the window snapshots
that cover its events. The :class:`Settler` does that on a task of its own, so the event loop
never waits for the broker. It stops at the first failure, acking nothing after it: the failure
is reported to the :class:`~stream_detector.runtime.failures.FailurePolicy` (the worker stops).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from ..detector import PreparedBatch, RawRecord
from ..errors import BatchFailed
from ..kafka.output import Deliveries
from .failures import FailurePolicy
from .fencing import ZombieFence

# Batches whose window snapshots may be on their way to the changelog while the next is handled
# (under a backlog): the worker does not wait a broker round trip per batch; offsets still wait.
WRITES_IN_FLIGHT = 4
# Judged batches waiting for their alerts to be acknowledged before the loop waits too.
SETTLING_MAX = 32

# Stages of a batch, as named in failures (BatchFailed.stage) and the batch-failure metric.
# (`consume`: taking the next batch from the stream.)
# (`fence`: the zombie check before snapshots, see runtime.fencing: the worker was evicted.)
CONSUME, DECODE, WINDOW, SCORE, JUDGE, SEND_ALERTS, FENCE, SEND_SNAPSHOTS, ACK = (
    "consume", "decode", "window", "score", "judge", "send_alerts", "fence", "send_snapshots", "ack")
STAGES = (CONSUME, DECODE, WINDOW, SCORE, JUDGE, SEND_ALERTS, FENCE, SEND_SNAPSHOTS, ACK)


@dataclass(slots=True)
class Scoring:
    """A micro-batch windowed and being scored on the inference thread, in parts (in order)."""

    events: list[Any]  # Faust events, acked once the batch's snapshots are written
    parts: list[tuple[PreparedBatch, asyncio.Future | None]]  # each part's scores; None: none scored
    sent: Deliveries  # its dead letters, then its alerts


@dataclass(slots=True)
class Published:
    sent: Deliveries
    messages: list[tuple[dict[str, Any], RawRecord | None]]  # alert messages, with their records
    dead_letters: int
    shadow: list[dict[str, Any]] = field(default_factory=list)  # the challenger's, sent to the shadow topic
    forwarded: int = 0  # events forwarded to the repartition topic (their offsets acked once the broker has them)


@dataclass(slots=True)
class Snapshots:
    """Changelog records (key, snapshot or None for a delete, partition) taken at a batch boundary."""

    items: list[tuple[bytes, bytes | None, int]]
    revocations: int  # revocations seen when they were taken
    keys: list[str]  # keys whose item is a window part still to be completed (the last items), in order
    covers: int | None  # once written, the events of micro-batches up to this one are covered


class Settler:
    """Finishes micro-batches in order on a task of its own, so the loop never waits for the broker.

    Per batch, in the order the batches were judged: its alerts and dead letters are awaited (the
    broker has them), then its window snapshots, if it carries any, are sent (so a snapshot never
    runs ahead of the alerts it follows, and a key's snapshots reach the changelog in order), and
    once the broker has those, the input events they cover are acked (Faust may commit them). The
    loop meanwhile takes, windows and judges the next batches: a slow acknowledgement (the broker
    occasionally takes 50 to 100 ms) delays commits, not the alerts of the events behind it.
    Bounded: the loop waits once ``SETTLING_MAX`` batches are waiting to be settled.

    With a ``fence`` (:mod:`~stream_detector.runtime.fencing`), snapshots are not sent after the
    broker was out of reach until the group confirms this worker still holds its partitions.

    The first failure ends the task (as :class:`BatchFailed` naming its stage): nothing after it
    is acked, :meth:`check` and :meth:`put` raise it, and ``failures`` (if given) is told at once.
    """

    def __init__(self, publish: Callable[[Published], Awaitable[None]],
                 send_snapshots: Callable[[Snapshots], Awaitable[Any] | None],
                 ack: Callable[[list[Any]], Awaitable[None]], assignment: Callable[[], Any],
                 generation: Callable[[], Any] = lambda: None, failures: FailurePolicy | None = None,
                 fence: ZombieFence | None = None):
        self._publish, self._send_snapshots, self._ack, self._assignment = publish, send_snapshots, ack, assignment
        self._generation = generation
        self._fence = fence
        self._queue: asyncio.Queue[tuple[Published | None, Snapshots | None, list[Any], int] | None] = \
            asyncio.Queue(maxsize=SETTLING_MAX)
        # Settled micro-batches (number, events) whose events no written snapshot covers yet.
        self._unacked: deque[tuple[int, list[Any]]] = deque()
        # Snapshot writes the broker has not acknowledged yet, oldest first, each with the events it
        # covers: under a backlog up to WRITES_IN_FLIGHT stay out while the next batches settle.
        # (The snapshots too: sent again if the producer purged them.)
        self._writing: deque[tuple[Awaitable[Any] | None, list[Any], Snapshots]] = deque()
        self._task = asyncio.ensure_future(self._run())
        if failures is not None:
            self._task.add_done_callback(lambda task: self._report(task, failures))

    @staticmethod
    def _report(task: asyncio.Future, failures: FailurePolicy) -> None:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            failures.fail(exc.stage if isinstance(exc, BatchFailed) else SEND_ALERTS, exc)  # type: ignore[arg-type]

    def check(self) -> None:
        """Raises what stopped the settler (an undeliverable alert or snapshot), if anything did."""
        if self._task.done() and not self._task.cancelled():
            self._task.result()

    async def put(self, published: Published | None, snapshots: Snapshots | None, events: list[Any],
                  batch: int = -1) -> None:
        """Hands over a judged micro-batch (its alerts sent) numbered ``batch``, with its events, and
        the snapshots collected at its end (if any)."""
        self.check()
        if self._queue.full():  # the broker is behind: wait, but not past the settler's failure
            put = asyncio.ensure_future(self._queue.put((published, snapshots, events, batch)))
            await asyncio.wait({put, self._task}, return_when=asyncio.FIRST_COMPLETED)
            if not put.done():
                put.cancel()
                self.check()
            return
        self._queue.put_nowait((published, snapshots, events, batch))

    def unsettled(self) -> int:
        """Events handed over and not acked yet."""
        return (sum(len(item[2]) for item in self._queue._queue if item is not None)  # type: ignore[attr-defined]
                + sum(len(events) for _, events in self._unacked)
                + sum(len(covered) for _, covered, _ in self._writing))

    async def close(self) -> None:
        """Settles everything handed over (raises if that fails) and stops."""
        self.check()
        await self._queue.put(None)
        await self._task

    def cancel(self) -> None:
        self._task.cancel()

    async def _run(self) -> None:
        queue = self._queue
        while True:
            item = await queue.get()
            if item is None:
                await self._settle_writes(wait=True)
                return
            published, snapshots, events, batch = item
            unacked = self._unacked
            if events:
                unacked.append((batch, events))
            if published is not None:
                try:
                    await self._publish(published)
                except Exception as exc:
                    raise BatchFailed(SEND_ALERTS, exc) from exc
            if snapshots is not None:
                fence = self._fence
                if fence is not None and fence.due():  # the broker was out of reach since the last write
                    await self._check_fence()
                    # Writes the producer purged meanwhile go again first, in order, before this one.
                    await self._settle_writes(wait=True)
                try:
                    sent = self._send_snapshots(snapshots)
                except Exception as exc:
                    raise BatchFailed(SEND_SNAPSHOTS, exc) from exc
                covered: list[Any] = []
                while unacked and snapshots.covers is not None and unacked[0][0] <= snapshots.covers:
                    covered.extend(unacked.popleft()[1])
                if sent is not None or covered:
                    self._writing.append((sent, covered, snapshots))
            # Nothing behind: wait for the writes now, so that the offsets are committed soon.
            await self._settle_writes(wait=queue.empty())

    async def _check_fence(self) -> None:
        assert self._fence is not None
        try:
            await self._fence.check()
        except Exception as exc:
            raise BatchFailed(FENCE, exc) from exc

    async def _settle_writes(self, wait: bool) -> None:
        """Acks, in order, the events of every write that is in the changelog (all of them when
        ``wait``; else at most ``WRITES_IN_FLIGHT`` writes stay out).

        A write the producer purged (the broker out of reach too long, see ``runtime.fencing``) is
        sent again once the fence has passed, and every write after it is settled (and sent again
        if purged too) before anything else is written: a key's snapshots stay in order."""
        writing = self._writing
        while writing:
            written, covered, snapshots = writing[0]
            if written is not None:
                if not written.done() and not wait and len(writing) <= WRITES_IN_FLIGHT:
                    break
                try:
                    await written  # in the changelog before the offsets may be committed (raises if not)
                except Exception as exc:
                    if self._fence is None or not getattr(exc, "purged", False):
                        raise BatchFailed(SEND_SNAPSHOTS, exc) from exc
                    await self._check_fence()
                    try:
                        writing[0] = (self._send_snapshots(snapshots), covered, snapshots)
                    except Exception as exc2:
                        raise BatchFailed(SEND_SNAPSHOTS, exc2) from exc2
                    wait = True
                    continue
            writing.popleft()
            if covered:
                # Not events of partitions revoked since: Faust forgot their acks at the revocation,
                # and a late ack would bring back a stale committable offset for them.
                # Nor events fetched before a rebalance whose partition came back to this worker: Faust
                # forgot their partition's acks and committed offset at the revocation, re-delivers
                # them from the committed offset, and an ack from the old generation would be booked
                # into the new one's (seen as commits stuck for good on the two-worker rebalance test).
                assigned, generation = self._assignment(), self._generation()
                try:
                    await self._ack([e for e in covered if e.message.tp in assigned
                                     and getattr(e.message, "generation_id", generation) == generation])
                except Exception as exc:
                    raise BatchFailed(ACK, exc) from exc
