"""Fixes to faust-streaming's rebalance recovery, used by every worker: a race that loses events
(below), a restore that stalls for ever (:func:`reread_stalled_changelogs`), and input partitions
without a committed offset whose first records are skipped (:func:`seek_uncommitted`).

**The race.** At the end of a rebalance, Faust's table recovery (``Recovery._resume_streams`` and
the end of ``Recovery._restart_recovery``) does, in this order:

1. ``consumer.resume_partitions(input partitions)``: the fetcher may fetch from them again;
2. ``await consumer.perform_seek()``: seeks them to their committed offsets and sets the
   consumer's *read offsets* to those, a broker round trip during which the event loop runs on;
3. ``app.flow_control.resume()``, which **clears every stream's queue**.

Flow was already resumed earlier in the same recovery (to read the changelogs), so between 1 and 3
the fetcher delivers the input partitions' first records into the stream queues and moves the read
offsets past them. Step 3 then drops them, and when the broker sends them again the fetcher drops
them as already read (``offset < read offset``). They are never processed and never acknowledged,
so the partition's committed offset stops at the first of them for good (Faust commits only up to
the first gap in acknowledged offsets), and whoever next owns the partition re-reads everything
from there.

Seen on the two-worker rebalance test, with the queues and offsets logged: a worker joining a
group had 26 events cleared this way and its commits stuck at its first offsets for the rest of its
life; the worker taking all partitions after the other stopped had 1,177 cleared, and then dropped
their re-fetched copies as already read.

**The fix** (:class:`RebalanceSafeFlowControl`, the worker app's ``flow_control``). Clearing on
resume is for events queued while flow was suspended (a rebalance in progress), which belong to the
old assignment. When flow is *not* suspended, there is nothing of the old assignment to drop (the
queues were cleared when flow was suspended, and the conductor waits for flow before it queues
anything), and what the queues hold was fetched for the current one. So resuming clears only when
it actually ends a suspension. Stale events that could still reach a queue (a delivery under way
when flow was suspended) carry the old generation id, and Faust's stream skips those itself.

Upstream: the same clearing has been met before in other orders of these steps: faust-streaming#216
(fixed by #217: seek before resuming flow), #253 ("When the app flow_control resumes it clears all
queues": resume the consumer after flow control) and #236 (events reordered by the clearing). The
order left in 0.15.3's ``Recovery._resume_streams`` and ``_restart_recovery`` (partitions resumed,
then a seek, then flow resumed) still loses events as above; no upstream issue names it.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from mode.utils.queues import FlowControlEvent

log = logging.getLogger(__name__)


class RebalanceSafeFlowControl(FlowControlEvent):
    """mode's flow control event whose ``resume`` clears the queues only when it ends a suspension
    (see the module docstring)."""

    def resume(self) -> None:
        if self._suspend.is_set():
            super().resume()  # ends a suspension: clears what was queued for the old assignment
        else:
            self._resume.set()  # already flowing: what is queued is current, keep it


# A changelog partition being restored that has had no record for this long, while its high
# watermark says there are records left to read, is read again from where its restore stands.
RECOVERY_STALL_S = 10.0


async def reread_stalled_changelogs(app: Any, now: float, reread: dict,
                                    stall_s: float = RECOVERY_STALL_S) -> list[Any]:
    """Seeks every stalled changelog partition of a table recovery back to its next unread offset.

    Why: now and then a recovery never receives the records of a changelog partition the worker
    kept through a rebalance (faust-streaming#74 and #155; the same endless wait from other causes:
    #176, #597 and #651, all open). Its restore then waits for ever ("No event received for
    active tp ... since recovery start", every 5 s), and so do the input partitions behind it.
    Seen on the two-worker rebalance test, about once in 15 runs; the fetcher was running and the
    broker had the records. Reading the partition again from the offset after the last record the
    recovery applied (the start, when it applied none) gets them, and a record applied twice only
    puts the same snapshot again. ``now`` is ``time.monotonic()``, Faust's recovery clock;
    ``reread`` is the caller's record of its attempts (the time of the last one per partition),
    kept from one call to the next. Returns the partitions sought back.
    """
    recovery = app.tables.recovery
    started = getattr(recovery, "_recovery_started_at", None)
    if not recovery.in_recovery or started is None:
        return []
    received = recovery._active_events_received_at
    assigned = app.consumer.assignment()
    stalled = {}
    for tp in list(recovery.active_tps):
        highwater = recovery.active_highwaters.get(tp)
        applied = recovery.active_offsets.get(tp, -1)
        if tp not in assigned or highwater is None or highwater < 0 or applied >= highwater:
            continue  # not ours any more, empty, or restored
        if now - max(received.get(tp, started), reread.get(tp, started), started) < stall_s:
            continue
        stalled[tp] = max(applied + 1, 0)
    if stalled:
        log.warning("table recovery stalled on %s (no record for %.0f s, records left): reading them again "
                    "from offsets %s", sorted(map(tuple, stalled)), stall_s,
                    {tuple(tp): offset for tp, offset in stalled.items()})
        for tp in stalled:
            reread[tp] = now  # a fresh interval before the next attempt
        app.consumer.resume_partitions(set(stalled))
        await app.consumer.seek_wait(stalled)
    return list(stalled)


def uncommitted_positions(committed: Mapping[int, int], earliest: Mapping[int, int | None],
                          auto_offset_reset: str) -> dict[int, int]:
    """Where each assigned input partition without a committed offset past 0 is to be read from:
    0 where the group committed 0; where none (``committed`` -1) and the group starts at the
    earliest offset, the partition's first offset (``earliest``). Partitions left out are sought
    by Faust itself (committed past 0), or start at the end (``latest``)."""
    out: dict[int, int] = {}
    for partition, offset in committed.items():
        if offset == 0:
            out[partition] = 0
        elif offset < 0 and auto_offset_reset == "earliest" and earliest.get(partition) is not None:
            out[partition] = int(earliest[partition])  # type: ignore[arg-type]
    return out


async def seek_uncommitted(app: Any, topic: str, committed: Mapping[int, int], auto_offset_reset: str) -> dict[int, int]:
    """Seeks the assigned input partitions that have no committed offset past 0 to where the group
    reads them from (:func:`uncommitted_positions`); call while the recovery holds them paused.

    Why: as a partition is assigned, the consumer resets its position (to the earliest offset) and
    may fetch its first records before Faust pauses it for the table recovery; Faust's fetcher
    drops those (the partition is not active yet) and the consumer's position has moved past them.
    At the end of the recovery Faust seeks every partition to its committed offset, but aiokafka's
    ``seek_to_committed`` seeks only to an offset above 0: a partition with none (the input topic
    grown, or deleted and recreated, or a new group on a topic with records) or with 0 (the group
    reset to its start) stays past them. Seen on the chaos tests: the new topic's 400 events and the
    grown partitions' first events were never consumed, their lag never went down. Returns the
    positions sought (input partition -> offset)."""
    from faust.types import TP

    if not committed:
        return {}
    earliest: Mapping[Any, int | None] = {}
    if auto_offset_reset == "earliest" and any(offset < 0 for offset in committed.values()):
        earliest = await app.consumer.earliest_offsets(*(TP(topic, p) for p, o in committed.items() if o < 0))
    positions = uncommitted_positions(committed, {tp.partition: offset for tp, offset in earliest.items()},
                                      auto_offset_reset)
    if positions:
        await app.consumer.seek_wait({TP(topic, p): offset for p, offset in positions.items()})
    return positions
