"""Zombie fencing without a broker: the membership check after the broker was out of reach, the
settler's order around it, the output producer's stall detection and purge, and the test tools
(the proxied listener of the local broker, the TCP proxy) the zombie chaos test relies on."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from stream_detector.errors import BatchFailed, DeliveryError
from stream_detector.kafka.admin import GroupUnsettled
from stream_detector.kafka.local_broker import LocalBroker
from stream_detector.kafka.output import OutputProducer
from stream_detector.runtime.fencing import Fenced, ZombieFence

from tcp_proxy import TcpProxy
from test_settler import Broker, _event, _published, _settle, _snapshots


def _fence(held, assigned=frozenset({0, 1}), reachable=lambda: True) -> ZombieFence:
    async def ask():
        answer = held.pop(0) if isinstance(held, list) else held
        if isinstance(answer, Exception):
            raise answer
        return answer

    return ZombieFence(lambda: True, reachable, ask, lambda: set(assigned), retry_s=0.0, unsettled_retries=3)


def test_a_worker_whose_member_still_holds_its_partitions_passes_the_fence():
    asyncio.run(_fence({0, 1, 2}).check())


def test_a_worker_evicted_from_the_group_is_fenced():
    with pytest.raises(Fenced, match="no longer a member"):
        asyncio.run(_fence(None).check())


def test_a_worker_whose_partition_moved_to_another_member_is_fenced_once_the_answer_stays_so():
    with pytest.raises(Fenced, match=r"\[1\]"):
        asyncio.run(_fence({0}).check())
    # The consumer had not applied its new assignment yet when first asked: not fenced.
    asyncio.run(_fence([{0}, {0, 1}]).check())


def test_a_rebalancing_group_is_asked_again_and_one_that_cannot_be_asked_lets_the_write_go():
    asyncio.run(_fence([GroupUnsettled("rebalancing"), GroupUnsettled("rebalancing"), {0, 1}]).check())
    with pytest.raises(Fenced):
        asyncio.run(_fence([GroupUnsettled("rebalancing"), None]).check())
    asyncio.run(_fence(RuntimeError("not authorised to describe the group")).check())


def test_the_group_is_asked_only_once_the_broker_is_in_reach_again():
    async def main() -> list[str]:
        log: list[str] = []
        reachable = [False]

        async def ask():
            log.append("asked")
            return {0, 1}

        fence = ZombieFence(lambda: True, lambda: reachable[0], ask, lambda: {0, 1})
        checking = asyncio.ensure_future(fence.check())
        await asyncio.sleep(0.2)
        log.append("reachable")
        reachable[0] = True
        await asyncio.wait_for(checking, 1.0)
        return log

    assert asyncio.run(main()) == ["reachable", "asked"]


class _Fence:
    """A fence whose checks are logged with the broker's events; raises ``verdict`` when set."""

    def __init__(self, log: list[str], verdict: Exception | None = None):
        self.log, self.verdict, self.stalled = log, verdict, False

    def due(self) -> bool:
        stalled, self.stalled = self.stalled, False
        return stalled

    async def check(self) -> None:
        self.log.append("fence checked")
        if self.verdict is not None:
            raise self.verdict


def test_a_fenced_worker_writes_no_snapshot_and_acks_no_event_after_the_broker_was_out_of_reach():
    async def main() -> tuple[list[str], BatchFailed]:
        broker = Broker()
        fence = _Fence(broker.log, Fenced("evicted"))
        from stream_detector.runtime.checkpoint import Settler

        settler = Settler(broker.publish, broker.send_snapshots, broker.ack_events, lambda: broker.assigned,
                          fence=fence)  # type: ignore[arg-type]
        fence.stalled = True  # the broker out of reach while batch 1's alerts waited
        await settler.put(_published("b1"), _snapshots("s1", 1), [_event(0, 1)], 1)
        await _settle()
        broker.ack("alerts b1")
        await _settle()
        with pytest.raises(BatchFailed) as failed:
            settler.check()
        return broker.log, failed.value

    log, failed = asyncio.run(main())
    assert failed.stage == "fence"
    assert log == ["awaiting alerts b1", "acked alerts b1", "fence checked"]  # no snapshot sent, no event acked


def test_snapshot_writes_the_producer_purged_go_again_in_order_after_the_fence_before_any_later_write():
    async def main() -> list[str]:
        broker = Broker()
        fence = _Fence(broker.log)
        from stream_detector.runtime.checkpoint import Settler

        settler = Settler(broker.publish, broker.send_snapshots, broker.ack_events, lambda: broker.assigned,
                          fence=fence)  # type: ignore[arg-type]
        await settler.put(None, _snapshots("s1", 1), [_event(0, 1)], 1)
        await settler.put(None, _snapshots("s2", 2), [_event(0, 2)], 2)
        await _settle()
        purged = DeliveryError("purged")
        purged.purged = True
        broker.ack("snapshots s1", purged)
        broker.ack("snapshots s2", purged)
        await _settle()
        fence.stalled = True
        later = asyncio.ensure_future(settler.put(None, _snapshots("s3", 3), [_event(0, 3)], 3))
        await _settle()
        broker.ack("snapshots s1")
        await _settle()
        broker.ack("snapshots s2")
        await _settle()
        await later
        await _settle()
        broker.ack("snapshots s3")
        await settler.close()
        return broker.log

    assert asyncio.run(main()) == [
        "sent snapshots s1", "sent snapshots s2",
        "fence checked", "sent snapshots s1",  # purged: sent again once the group says it is ours
        "acked events 1",
        "fence checked", "sent snapshots s2",
        "acked events 2",
        "fence checked",  # the next write after the stall, once the purged ones are in
        "sent snapshots s3", "acked events 3",
    ]


def test_the_output_producer_notes_a_stall_and_purges_what_it_holds_once_the_broker_stays_out_of_reach():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = OutputProducer(f"127.0.0.1:{port}", stall_s=0.3, purge_after_s=1.0,
                         extra={"reconnect.backoff.max.ms": 100})

    async def main() -> DeliveryError:
        sent = out.group()
        sent.send("t", b"k", b"v", 0)
        waiting = sent.wait()
        await asyncio.sleep(0.6)
        assert out.stalled() and not out.stalled()  # noted once, then forgotten
        assert not out.reachable()
        with pytest.raises(DeliveryError) as failed:
            await asyncio.wait_for(waiting, 5.0)
        return failed.value

    try:
        error = asyncio.run(main())
    finally:
        out.close(timeout=1.0)
    assert error.purged
    assert out.in_flight() == 0 and out.reachable()


def test_a_first_delivery_long_after_the_producer_was_made_is_not_taken_for_a_stall():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = OutputProducer(f"127.0.0.1:{port}", stall_s=0.5, purge_after_s=1.0)
    time.sleep(1.2)  # the worker starts up: its first snapshot comes later

    async def main() -> None:
        sent = out.group()
        sent.send("t", b"k", b"v", 0)
        waiting = sent.wait()
        await asyncio.sleep(0.3)
        assert not out.stalled() and not waiting.done()  # neither stalled nor purged yet

    try:
        asyncio.run(main())
    finally:
        out.close(timeout=0.5)


def test_the_local_broker_advertises_its_proxied_listener_at_the_proxy_port():
    broker = LocalBroker(port=40001, controller_port=40002, proxy_port=40003)
    props = broker._server_properties()
    assert f"PROXIED://127.0.0.1:{broker.proxied_listener_port}" in props["listeners"]
    assert "PROXIED://127.0.0.1:40003" in props["advertised.listeners"]
    assert "PLAINTEXT://127.0.0.1:40001" in props["advertised.listeners"]
    assert "PROXIED:PLAINTEXT" in props["listener.security.protocol.map"]
    assert broker.proxied_bootstrap_servers == "127.0.0.1:40003"
    assert broker.proxied_listener_port not in (40001, 40002, 40003)
    assert "PROXIED" not in LocalBroker(port=40001, controller_port=40002)._server_properties()["listeners"]


def test_the_tcp_proxy_passes_slows_cuts_and_heals_connections():
    server = socket.create_server(("127.0.0.1", 0))

    def echo() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=lambda c=conn: [c.sendall(d) for d in iter(lambda: c.recv(1024), b"")],
                             daemon=True).start()

    threading.Thread(target=echo, daemon=True).start()
    proxy = TcpProxy(server.getsockname()[1])

    def round_trip() -> float:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=3) as conn:
            conn.sendall(b"ping")
            assert conn.recv(16) == b"ping"
        return time.monotonic() - started

    def closed_at_once() -> bool:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=3) as conn:
            try:
                conn.sendall(b"ping")
                return conn.recv(16) == b""
            except ConnectionError:
                return True

    try:
        assert round_trip() < 0.2
        proxy.slow(0.3)
        assert round_trip() >= 0.6  # each way
        proxy.heal()
        held = socket.create_connection(("127.0.0.1", proxy.port), timeout=3)
        held.sendall(b"x")
        assert held.recv(16) == b"x"
        proxy.cut()
        assert held.recv(16) == b""  # dropped
        held.close()
        assert closed_at_once()  # new connections refused
        proxy.heal()
        assert round_trip() < 0.2
    finally:
        proxy.close()
        server.close()
