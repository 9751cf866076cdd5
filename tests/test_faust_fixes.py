"""The rebalance fix: resuming flow that was never suspended keeps the events queued for the current
assignment; ending a real suspension still clears what was queued for the old one."""

from __future__ import annotations

import asyncio

import pytest
from mode.utils.queues import FlowControlEvent, FlowControlQueue

from stream_detector.kafka import faust_fixes


@pytest.fixture
def fixed():
    faust_fixes.install()
    yield
    faust_fixes.uninstall()


def queue_with(flow: FlowControlEvent, values: list[int]) -> FlowControlQueue:
    queue: FlowControlQueue = FlowControlQueue(maxsize=100, flow_control=flow, clear_on_resume=True)
    for value in values:
        queue.put_nowait(value)
    return queue


def test_resuming_flow_that_is_already_flowing_keeps_the_queued_events(fixed):
    async def main():
        flow = FlowControlEvent(initially_suspended=False)
        queue = queue_with(flow, [1, 2, 3])  # fetched for the current assignment
        flow.resume()  # Faust's recovery resumes again after seeking, flow having been resumed before
        assert flow.is_active()
        return [queue.get_nowait() for _ in range(queue.qsize())]

    assert asyncio.run(main()) == [1, 2, 3]


def test_ending_a_suspension_still_clears_what_was_queued_for_the_old_assignment(fixed):
    async def main():
        flow = FlowControlEvent(initially_suspended=False)
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

    faust_fixes.uninstall()
    assert asyncio.run(main()) == 0


def test_install_is_idempotent_and_uninstall_restores_modes_resume():
    faust_fixes.uninstall()  # in case a worker app built in this process installed it
    original = FlowControlEvent.resume
    faust_fixes.install()
    patched = FlowControlEvent.resume
    faust_fixes.install()
    assert FlowControlEvent.resume is patched is not original
    faust_fixes.uninstall()
    assert FlowControlEvent.resume is original
