"""The worker's settler: alerts, then snapshots, then acks, in batch order, off the loop's path."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from stream_detector.errors import BatchFailed
from stream_detector.runtime import checkpoint
from stream_detector.runtime.checkpoint import Published, Settler, Snapshots


def _event(partition: int, offset: int) -> SimpleNamespace:
    return SimpleNamespace(message=SimpleNamespace(tp=("in", partition), offset=offset))


class Broker:
    """Acknowledgements released by hand, and a log of what happened in which order."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.pending: dict[str, asyncio.Future] = {}
        self.assigned = {("in", 0), ("in", 1)}

    def _future(self, name: str) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.pending[name] = future
        return future

    def ack(self, name: str, error: Exception | None = None) -> None:
        future = self.pending.pop(name)
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    async def publish(self, published: Published) -> None:
        name = f"alerts {published.messages[0]}"
        self.log.append(f"awaiting {name}")
        await self._future(name)
        self.log.append(f"acked {name}")

    def send_snapshots(self, snapshots: Snapshots) -> asyncio.Future:
        name = f"snapshots {snapshots.items[0][0].decode()}"
        self.log.append(f"sent {name}")
        return self._future(name)

    async def ack_events(self, events: list) -> None:
        self.log.append("acked events " + ",".join(str(e.message.offset) for e in events))

    def settler(self) -> Settler:
        return Settler(self.publish, self.send_snapshots, self.ack_events, lambda: self.assigned)


def _published(name: str) -> Published:
    return Published(sent=None, messages=[name], dead_letters=0)  # type: ignore[arg-type]


def _snapshots(name: str, covers: int | None) -> Snapshots:
    return Snapshots(items=[(name.encode(), b"w", 0)], revocations=0, keys=[], covers=covers)


async def _settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def test_snapshots_wait_for_the_alerts_before_them_and_events_for_the_snapshots_that_cover_them():
    async def main() -> list[str]:
        broker = Broker()
        settler = broker.settler()
        await settler.put(_published("b1"), None, [_event(0, 1)], 1)
        await settler.put(_published("b2"), _snapshots("s2", 2), [_event(0, 2)], 2)
        await _settle()
        assert broker.log == ["awaiting alerts b1"]  # the loop was not held up: both handed over
        broker.ack("alerts b1")
        await _settle()
        broker.ack("alerts b2")
        await _settle()
        assert broker.log[-1] == "sent snapshots s2"
        assert settler.unsettled() == 2
        broker.ack("snapshots s2")
        await settler.close()
        assert settler.unsettled() == 0
        return broker.log

    assert asyncio.run(main()) == [
        "awaiting alerts b1", "acked alerts b1",
        "awaiting alerts b2", "acked alerts b2",
        "sent snapshots s2",
        "acked events 1,2",  # both batches' events are covered by the one write
    ]


def test_a_batch_whose_alerts_are_acknowledged_first_still_settles_after_the_one_before_it():
    async def main() -> list[str]:
        broker = Broker()
        settler = broker.settler()
        await settler.put(_published("b1"), _snapshots("s1", 1), [_event(0, 1)], 1)
        await settler.put(_published("b2"), _snapshots("s2", 2), [_event(0, 2)], 2)
        await _settle()
        assert "alerts b2" not in broker.pending  # not looked at before b1 is settled
        broker.ack("alerts b1")
        await _settle()
        broker.ack("alerts b2")
        await _settle()
        broker.ack("snapshots s2")
        broker.ack("snapshots s1")
        await settler.close()
        return broker.log

    log = asyncio.run(main())
    assert log.index("sent snapshots s1") < log.index("sent snapshots s2")
    assert log.index("acked events 1") < log.index("acked events 2")


def test_a_write_covering_only_earlier_batches_leaves_the_later_batches_events_unacked():
    async def main() -> list[str]:
        broker = Broker()
        settler = broker.settler()
        await settler.put(None, None, [_event(0, 1)], 1)
        await settler.put(None, _snapshots("s2", 1), [_event(0, 2)], 2)  # written at batch 2's end, due: batch 1's keys
        await _settle()
        broker.ack("snapshots s2")
        await _settle()
        assert broker.log[-1] == "acked events 1"
        assert settler.unsettled() == 1  # batch 2's keys are not written yet
        await settler.put(None, _snapshots("s3", 3), [_event(0, 3)], 3)
        await _settle()
        broker.ack("snapshots s3")
        await settler.close()
        assert settler.unsettled() == 0
        return broker.log

    assert asyncio.run(main())[-1] == "acked events 2,3"


def test_events_of_partitions_revoked_before_they_are_acked_are_not_acked():
    async def main() -> list[str]:
        broker = Broker()
        settler = broker.settler()
        await settler.put(None, _snapshots("s1", 1), [_event(0, 1), _event(1, 7)], 1)
        await _settle()
        broker.assigned = {("in", 0)}
        broker.ack("snapshots s1")
        await settler.close()
        return broker.log

    assert asyncio.run(main())[-1] == "acked events 1"


def test_the_loop_waits_only_once_the_settling_limit_is_reached(monkeypatch):
    monkeypatch.setattr(checkpoint, "SETTLING_MAX", 2)

    async def main() -> None:
        broker = Broker()
        settler = broker.settler()
        for i in range(3):  # one being settled, two waiting
            await settler.put(_published(f"b{i}"), None, [_event(0, i)], i)
            await _settle()
        blocked = asyncio.ensure_future(settler.put(_published("b3"), None, [_event(0, 3)], 3))
        await _settle()
        assert not blocked.done()
        broker.ack("alerts b0")
        await _settle()
        assert blocked.done()
        for i in range(1, 4):
            broker.ack(f"alerts b{i}")
            await _settle()
        await settler.close()

    asyncio.run(main())


def test_an_alert_the_broker_refuses_stops_the_settler_and_reaches_the_loop():
    async def main() -> None:
        broker = Broker()
        settler = broker.settler()
        await settler.put(_published("b1"), _snapshots("s1", 1), [_event(0, 1)], 1)
        await _settle()
        broker.ack("alerts b1", RuntimeError("alert not delivered"))
        await _settle()
        assert "sent snapshots s1" not in broker.log  # nothing written past an alert that is not there
        with pytest.raises(BatchFailed, match="alert not delivered") as failed:
            await settler.put(_published("b2"), None, [_event(0, 2)], 2)
        assert failed.value.stage == "send_alerts"
        assert settler.unsettled() == 1

    asyncio.run(main())


def test_a_full_settler_whose_alert_is_refused_does_not_leave_the_loop_waiting(monkeypatch):
    monkeypatch.setattr(checkpoint, "SETTLING_MAX", 1)

    async def main() -> None:
        broker = Broker()
        settler = broker.settler()
        await settler.put(_published("b1"), None, [_event(0, 1)], 1)
        await _settle()
        await settler.put(_published("b2"), None, [_event(0, 2)], 2)
        blocked = asyncio.ensure_future(settler.put(_published("b3"), None, [_event(0, 3)], 3))
        await _settle()
        broker.ack("alerts b1", RuntimeError("alert not delivered"))
        with pytest.raises(BatchFailed, match="alert not delivered"):
            await asyncio.wait_for(blocked, 1.0)

    asyncio.run(main())


def test_events_fetched_before_a_rebalance_are_not_acked_into_the_next_generation():
    """The partition came back to this worker: Faust re-delivers those events from the committed offset."""
    async def main() -> list[str]:
        broker = Broker()
        generation = [1]
        settler = Settler(broker.publish, broker.send_snapshots, broker.ack_events, lambda: broker.assigned,
                          lambda: generation[0])
        old, new = _event(0, 1), _event(0, 2)
        old.message.generation_id, new.message.generation_id = 1, 2
        await settler.put(None, _snapshots("s1", 2), [old, new], 2)
        await _settle()
        generation[0] = 2  # a rebalance: partition 0 revoked and assigned again
        broker.ack("snapshots s1")
        await settler.close()
        return broker.log

    assert asyncio.run(main())[-1] == "acked events 2"
