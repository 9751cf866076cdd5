"""The worker's Faust app: Faust's own ``App``, given the project's classes through Faust's
extension points only (an ``App`` subclass, its ``Settings`` class, a transport of its own), never
by assigning to Faust's, mode's or aiokafka's classes or modules.

- :meth:`DetectorApp._new_transport` builds the transport the settings ask for
  (:func:`stream_detector.kafka.faust_fastpath.transport_class`): with the consumer fast path,
  :class:`~stream_detector.kafka.faust_fastpath.FastTransport`; without it, Faust's own (or, for
  another fetch wait than Faust's, its consumer with only the wait changed).
- :attr:`DetectorApp.flow_control` is :class:`~stream_detector.kafka.faust_fixes.RebalanceSafeFlowControl`
  (a rebalance race that lost events: always, it is a fix, not a speed-up).
- :meth:`DetectorApp.on_init_dependencies` takes Faust's monitor off the per-event sensors with the
  fast path.
- :class:`DetectorWorker` is Faust's worker without its terminal spinner.

The classes override Faust internals written for one faust-streaming (and the mode-streaming it
runs on), so :func:`check_versions` refuses any other: the app cannot be built there.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable, Iterable

import faust
from faust.types.settings import params, sections
from mode import ServiceT
from mode.utils.objects import cached_property
from mode.utils.queues import FlowControlEvent

from ..errors import UnsupportedDependency
from .faust_fastpath import FAUST_FETCH_MAX_WAIT_MS, transport_class
from .faust_fixes import RebalanceSafeFlowControl

#: The versions the worker's Faust classes were written and tested against.
TESTED_VERSIONS: dict[str, tuple[str, ...]] = {
    "faust-streaming": ("0.15.3",),
    "mode-streaming": ("0.7.1",),
}


def check_versions(installed: Callable[[str], str] = version) -> None:
    """Raises :class:`UnsupportedDependency` unless every library in :data:`TESTED_VERSIONS` is
    installed at a tested version (``installed``: the installed version of a distribution)."""
    problems = []
    for name, tested in TESTED_VERSIONS.items():
        try:
            found = installed(name)
        except PackageNotFoundError:
            found = "not installed"
        if found not in tested:
            problems.append(f"{name} {found} (tested: {', '.join(tested)})")
    if problems:
        raise UnsupportedDependency(
            "the worker's Faust consumer, producer and flow control override internals of these "
            "libraries and were tested only on the versions named: " + "; ".join(problems)
            + ". Install the tested versions (pip install " + " ".join(
                f"{name}=={tested[-1]}" for name, tested in TESTED_VERSIONS.items()) + ").")


class DetectorSettings(faust.Settings):
    """Faust's settings and two of the worker's, read by its transport."""

    @sections.Consumer.setting(params.UnsignedInt, default=FAUST_FETCH_MAX_WAIT_MS)
    def consumer_fetch_max_wait_ms(self) -> int:
        """How long the broker may hold a fetch for partitions with nothing new (Faust: 1,500 ms)."""

    @sections.Consumer.setting(params.Bool, default=False)
    def consumer_fast_path(self) -> bool:
        """Deliver records through the project's consumer and producer classes (see
        :mod:`stream_detector.kafka.faust_fastpath`) instead of Faust's own."""


class DetectorApp(faust.App):
    """``faust.App`` with the worker's transport, flow control and sensors (module docstring).
    Refuses to be built on an untested faust-streaming or mode-streaming."""

    Settings = DetectorSettings

    #: Set by :func:`stream_detector.worker.create_app`: the worker's own producer (alerts, dead
    #: letters, snapshots), closed once the worker stops, and its batch pipeline.
    output: Any = None
    pipeline: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_versions()
        super().__init__(*args, **kwargs)

    def _new_transport(self) -> Any:
        conf = self.conf
        cls = transport_class(conf.consumer_fast_path, conf.consumer_fetch_max_wait_ms)
        return cls(conf.broker_consumer, self)

    @cached_property
    def flow_control(self) -> FlowControlEvent:
        return RebalanceSafeFlowControl(loop=self.loop)

    def on_init_dependencies(self) -> Iterable[ServiceT]:
        """Faust's, less its monitor among the per-event sensors with the fast path.

        Faust feeds its ``Monitor`` sensor four times per event (record in, stream in and out,
        acked) for the statistics of its web views, which the worker does not serve. It stays the
        app's monitor (commits and end offsets still reach it); only the per-event calls go. No
        upstream issue covers this cost (it is part of robinhood/faust#563).
        """
        services = super().on_init_dependencies()  # adds the monitor to the sensors
        if self.conf.consumer_fast_path:
            self.sensors.remove(self.monitor)
        return services


class DetectorWorker(faust.Worker):
    """Faust's worker without its terminal progress spinner, whose escape codes (cursor hide and
    show) would land in the logs too when they are not a terminal."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spinner = None
