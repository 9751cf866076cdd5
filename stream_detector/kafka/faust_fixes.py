"""A fix to faust-streaming's rebalance recovery that loses events: installed in every worker.

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

**The fix.** Clearing on resume is for events queued while flow was suspended (a rebalance in
progress), which belong to the old assignment. When flow is *not* suspended, there is nothing of
the old assignment to drop (the queues were cleared when flow was suspended, and the conductor waits
for flow before it queues anything), and what the queues hold was fetched for the current one. So
``FlowControlEvent.resume`` now clears only when it actually ends a suspension. Stale events that
could still reach a queue (a delivery under way when flow was suspended) carry the old generation
id, and Faust's stream skips those itself.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

_original_resume: Any = None


def _resume_clearing_only_after_suspension(original: Any) -> Any:
    def resume(self: Any) -> None:
        if self._suspend.is_set():
            original(self)  # ends a suspension: clears what was queued for the old assignment
        else:
            self._resume.set()  # already flowing: what is queued is current, keep it

    resume.__doc__ = original.__doc__
    resume.__wrapped__ = original  # type: ignore[attr-defined]
    return resume


def install() -> None:
    """Idempotent."""
    global _original_resume
    from mode.utils.queues import FlowControlEvent

    if _original_resume is not None:
        return
    if not all(hasattr(FlowControlEvent, name) for name in ("resume", "clear")):  # pragma: no cover
        log.warning("mode's FlowControlEvent has changed: rebalance queue fix not installed")
        return
    _original_resume = FlowControlEvent.resume
    FlowControlEvent.resume = _resume_clearing_only_after_suspension(_original_resume)


def uninstall() -> None:
    global _original_resume
    from mode.utils.queues import FlowControlEvent

    if _original_resume is not None:
        FlowControlEvent.resume = _original_resume
        _original_resume = None
