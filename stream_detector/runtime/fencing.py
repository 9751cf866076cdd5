"""Zombie fencing: a worker that lost touch with the broker checks it still holds its partitions
before it writes window state again.

Cut off from the broker for longer than its session timeout, a worker is evicted from its
consumer group and its partitions go to another worker, which restores their changelog and
writes newer snapshots. The evicted worker (a zombie) does not know: it goes on judging the
events it had fetched, and what it queued while cut off (alerts, then, once those are
acknowledged, window snapshots and offsets) reaches the broker when the connection heals, before
its consumer's next heartbeat tells it of the eviction. Its snapshots would then land after its
successor's, and the next restore of those keys would bring their windows back in time (the
zombie chaos test, ``tests/test_chaos_zombie.py``, saw exactly that). Offsets need no fence: the
group coordinator refuses an evicted member's commits.

So, before the :class:`~stream_detector.runtime.checkpoint.Settler` sends snapshots, if an output
producer has had a delivery outstanding without any acknowledgement for ``STALL_S`` or more since
the last check (:meth:`ZombieFence.due`), :meth:`ZombieFence.check` waits until the broker answers
again and asks the group coordinator which input partitions this worker's member holds. If the
member is gone from the group, or no longer holds a partition the worker still thinks it has, the
worker was fenced: :class:`Fenced` is raised, the settler fails with stage ``fence``, and the
worker exits at once (status 70, as any batch failure: nothing more written, nothing acked; the
events are redelivered to the partitions' owner). A restarted worker joins as a new member.

Snapshots handed to the producer before the cut would still be sent when it heals: the worker's
snapshot producer purges what it holds after half a session timeout without an acknowledgement
(before the group can evict the worker), and the settler sends purged writes again, in order and
before any later one, once the check has passed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from ..errors import StreamDetectorError
from ..kafka.admin import GroupUnsettled

log = logging.getLogger("stream_detector.worker")

# No delivery acknowledged for this long while one is outstanding: the broker was out of reach.
# Far above a healthy round trip (the local broker occasionally takes 50 to 100 ms) and far below
# the least session timeout (6 s), so a cut is noticed well before the group can evict the worker.
STALL_S = 1.0
# A group in the middle of a rebalance says nothing final about who holds what: asked again.
UNSETTLED_RETRIES = 20
RETRY_S = 0.5


class Fenced(StreamDetectorError):
    """The group gave this worker's partitions to another member while it was cut off."""


class ZombieFence:
    """See the module docstring.

    ``stalled()`` says (and forgets) whether the output producer was out of reach since it was
    last asked; ``reachable()`` whether it is in reach now; ``held()`` the input partitions this
    worker's member holds as the group coordinator sees them (None if the member is not in the
    group; raises :class:`GroupUnsettled` while the group rebalances, anything else if it cannot
    be asked); ``assigned()`` the input partitions the worker's consumer thinks it holds.
    """

    def __init__(self, stalled: Callable[[], bool], reachable: Callable[[], bool],
                 held: Callable[[], Awaitable[set[int] | None]], assigned: Callable[[], set[int]],
                 retry_s: float = RETRY_S, unsettled_retries: int = UNSETTLED_RETRIES):
        self._stalled, self._reachable, self._held, self._assigned = stalled, reachable, held, assigned
        self._retry_s = retry_s
        self._unsettled_retries = unsettled_retries
        self.checks = 0  # membership checks made (each after a stall)

    def due(self) -> bool:
        """Whether the broker was out of reach since the last call (cheap; call before every write)."""
        return self._stalled()

    async def check(self) -> None:
        """After a stall: waits for the broker, then raises :class:`Fenced` if the group moved a
        partition this worker thinks it holds to another member. When the coordinator cannot be
        asked (refused, or the group stays mid-rebalance), logs it and lets the write go ahead."""
        while not self._reachable():
            await asyncio.sleep(0.05)
        self.checks += 1
        log.info("the broker was out of reach: asking the group coordinator whether this worker still holds "
                 "its input partitions before it writes window state again")
        for attempt in range(self._unsettled_retries + 1):
            try:
                held = await self._held()
            except GroupUnsettled:
                await asyncio.sleep(self._retry_s)
                continue
            except Exception as exc:
                log.warning("after the broker was out of reach, the group's assignment could not be read "
                            "(%s: %s): snapshots written without the zombie check", type(exc).__name__, exc)
                return
            assigned = self._assigned()
            if held is None:
                raise Fenced(f"this worker is no longer a member of its consumer group (evicted while the "
                             f"broker was out of reach); its input partitions {sorted(assigned)} belong to "
                             f"another member")
            lost = assigned - held
            if not lost:
                return
            if attempt < self._unsettled_retries:  # the consumer may not have applied a new assignment yet
                await asyncio.sleep(self._retry_s)
                continue
            raise Fenced(f"input partitions {sorted(lost)} were given to another member while the broker "
                         f"was out of reach")
        log.warning("after the broker was out of reach, the group kept rebalancing: snapshots written "
                    "without the zombie check")
