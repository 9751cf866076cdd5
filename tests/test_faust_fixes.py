"""The rebalance fix: resuming flow that was never suspended keeps the events queued for the current
assignment; ending a real suspension still clears what was queued for the old one."""

from __future__ import annotations

import asyncio

from mode.utils.queues import FlowControlEvent, FlowControlQueue

from stream_detector.kafka import faust_fixes
from stream_detector.kafka.faust_fixes import RebalanceSafeFlowControl


def queue_with(flow: FlowControlEvent, values: list[int]) -> FlowControlQueue:
    queue: FlowControlQueue = FlowControlQueue(maxsize=100, flow_control=flow, clear_on_resume=True)
    for value in values:
        queue.put_nowait(value)
    return queue


def test_resuming_flow_that_is_already_flowing_keeps_the_queued_events():
    async def main():
        flow = RebalanceSafeFlowControl(initially_suspended=False)
        queue = queue_with(flow, [1, 2, 3])  # fetched for the current assignment
        flow.resume()  # Faust's recovery resumes again after seeking, flow having been resumed before
        assert flow.is_active()
        return [queue.get_nowait() for _ in range(queue.qsize())]

    assert asyncio.run(main()) == [1, 2, 3]


def test_ending_a_suspension_still_clears_what_was_queued_for_the_old_assignment():
    async def main():
        flow = RebalanceSafeFlowControl(initially_suspended=False)
        queue = queue_with(flow, [1, 2, 3])
        flow.suspend()  # a rebalance starts
        flow.resume()
        assert flow.is_active()
        await asyncio.wait_for(flow.acquire(), timeout=1.0)  # producers waiting on flow go on
        return queue.qsize()

    assert asyncio.run(main()) == 0


def test_without_the_fix_faust_drops_events_queued_while_flowing():
    """What the fix is for: mode's own resume clears the queues even when flow was not suspended."""
    async def main():
        flow = FlowControlEvent(initially_suspended=False)
        queue = queue_with(flow, [1, 2, 3])
        flow.resume()
        return queue.qsize()

    assert asyncio.run(main()) == 0


def test_the_worker_app_flows_through_the_fixed_flow_control():
    import time

    from stream_detector.kafka.faust_app import DetectorApp

    async def main():
        app = DetectorApp(f"flow-{time.time_ns()}", broker="kafka://127.0.0.1:9", store="memory://",
                          web_enabled=False, loghandlers=[])
        queue = app.FlowControlQueue(maxsize=100, clear_on_resume=True)  # as Faust makes stream queues
        app.flow_control.resume()
        queue.put_nowait(1)
        app.flow_control.resume()  # the recovery's second resume, flow already going
        return type(app.flow_control), queue.qsize()

    assert asyncio.run(main()) == (RebalanceSafeFlowControl, 1)


class _Recovery:
    def __init__(self, started: float):
        self.in_recovery = True
        self._recovery_started_at = started
        self._active_events_received_at: dict = {}
        self.active_tps = {("log", 0), ("log", 1), ("log", 2), ("log", 3)}
        # Last offsets on the broker and last offsets applied: 0 is restored, 3 is empty.
        self.active_highwaters = {("log", 0): 9, ("log", 1): 12, ("log", 2): 40, ("log", 3): -1}
        self.active_offsets = {("log", 0): 9, ("log", 2): 17}


class _Consumer:
    def __init__(self):
        self.resumed: set = set()
        self.sought: dict = {}

    def assignment(self) -> set:
        return {("log", 0), ("log", 1), ("log", 2), ("log", 3)}

    def resume_partitions(self, tps: set) -> None:
        self.resumed |= tps

    async def seek_wait(self, offsets: dict) -> None:
        self.sought.update(offsets)


def _app(started: float):
    from types import SimpleNamespace

    return SimpleNamespace(tables=SimpleNamespace(recovery=_Recovery(started)), consumer=_Consumer())


def test_a_changelog_partition_whose_restore_stalls_is_read_again_from_its_next_unread_offset():
    app = _app(started=100.0)
    app.tables.recovery._active_events_received_at[("log", 2)] = 101.0  # then nothing more
    attempts: dict = {}
    reread = asyncio.run(faust_fixes.reread_stalled_changelogs(app, now=105.0, reread=attempts, stall_s=10.0))
    assert reread == [] and app.consumer.sought == {}  # not stalled for long enough yet

    reread = asyncio.run(faust_fixes.reread_stalled_changelogs(app, now=111.5, reread=attempts, stall_s=10.0))
    # 1 never got a record (from its start), 2 stopped after offset 17; 0 is restored, 3 is empty.
    assert sorted(reread) == [("log", 1), ("log", 2)]
    assert app.consumer.sought == {("log", 1): 0, ("log", 2): 18}
    assert app.consumer.resumed == {("log", 1), ("log", 2)}

    app.consumer.sought.clear()
    assert asyncio.run(faust_fixes.reread_stalled_changelogs(app, 115.0, attempts, stall_s=10.0)) == []  # just retried
    assert sorted(asyncio.run(faust_fixes.reread_stalled_changelogs(app, 122.0, attempts, stall_s=10.0))) == [
        ("log", 1), ("log", 2)]


def test_nothing_is_read_again_outside_a_recovery():
    app = _app(started=100.0)
    app.tables.recovery.in_recovery = False
    assert asyncio.run(faust_fixes.reread_stalled_changelogs(app, now=500.0, reread={})) == []
    assert app.consumer.sought == {}


def test_a_partition_without_a_committed_offset_is_read_from_its_first_offset_and_one_committed_at_0_from_0():
    committed = {0: -1, 1: 0, 2: 57, 3: -1}  # -1: none (a new partition, a recreated topic)
    earliest = {0: 0, 3: 120}  # partition 3's first records were deleted by retention
    assert faust_fixes.uncommitted_positions(committed, earliest, "earliest") == {0: 0, 1: 0, 3: 120}


def test_with_latest_a_partition_without_a_committed_offset_is_left_at_the_end():
    assert faust_fixes.uncommitted_positions({0: -1, 1: 0}, {0: 0}, "latest") == {1: 0}
