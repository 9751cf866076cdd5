"""The worker uses Faust through its extension points only: building and starting the worker's app
changes no attribute of any faust, mode or aiokafka class or module; the settings pick the project's
classes or Faust's own; an untested faust-streaming or mode-streaming refuses to start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from stream_detector.artifacts import save_artifact
from stream_detector.errors import UnsupportedDependency
from stream_detector.kafka import faust_app, faust_fastpath
from stream_detector.kafka.faust_fixes import RebalanceSafeFlowControl
from stream_detector.models import build_model
from stream_detector.preprocessing import ScalerParams
from stream_detector.profiles import SensorProfile
from stream_detector.thresholds import fit_quantile_threshold

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = build_model("lstm_ae", {"n_features": 3, "window": 4, "hidden": 8, "latent": 4})
    root = tmp_path_factory.mktemp("model")
    save_artifact(root, model, SensorProfile(("a", "b", "c")), ScalerParams.fit(rng.normal(0.0, 1.0, (100, 3))),
                  fit_quantile_threshold(rng.gamma(2.0, 1.0, 100), 0.99), version="20260101T000000Z-abcdef")
    return root


# Run in a fresh interpreter: the snapshot is taken before any of the project's modules is imported,
# so that a change made at import time is caught as well as one made while the app is built.
SNAPSHOT_SCRIPT = textwrap.dedent('''
    import asyncio, importlib, json, os, pkgutil, sys, warnings
    warnings.simplefilter("ignore")
    import aiokafka, faust, mode

    LIBRARIES = ("faust", "mode", "aiokafka")
    for package in (faust, mode, aiokafka):  # every module that imports here, so that all are compared
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name.endswith("__main__"):  # runs a command line when imported
                continue
            try:
                importlib.import_module(info.name)
            except Exception:
                pass

    # faust and mode load their top-level names lazily, on first use: load them all now.
    for name, module in list(sys.modules.items()):
        if module is not None and name.split(".")[0] in LIBRARIES:
            for attribute in getattr(module, "__all__", ()):
                try:
                    getattr(module, attribute)
                except Exception:
                    pass

    def snapshot():
        state = {}
        for name, module in list(sys.modules.items()):
            if module is None or name.split(".")[0] not in LIBRARIES:
                continue
            state[name] = {key: id(value) for key, value in list(vars(module).items())}
            for key, value in list(vars(module).items()):
                if isinstance(value, type) and value.__module__ == name:
                    state[name + ":" + value.__qualname__] = {k: id(v) for k, v in list(vars(value).items())}
        return state

    def changes(before, after):
        out = []
        for owner, attributes in before.items():
            now = after.get(owner, {})
            for key in set(attributes) | set(now):
                if attributes.get(key) != now.get(key):
                    out.append(owner + "." + key)
        return sorted(out)

    before = snapshot()
    from stream_detector.settings import Settings
    from stream_detector.worker import DetectorService, create_app

    async def build(fast_path):
        settings = Settings(model_dir=os.environ["SNAPSHOT_MODEL_DIR"], torch_threads=1, metrics_port=0,
                            bootstrap_servers="127.0.0.1:9", consumer_fast_path=fast_path)
        app = create_app(settings, DetectorService(settings))
        # Everything the app builds before its worker runs, and the consumer's own start-up steps.
        name = lambda obj: type(obj).__module__ + "." + type(obj).__qualname__
        kinds = [name(app.transport), name(app.consumer), name(app.producer), name(app.producer.buffer),
                 name(app.flow_control)]
        list(app.on_init_dependencies())
        app.finalize()
        kinds.append(app.monitor in list(app.sensors))
        client = app.consumer._thread._create_worker_consumer(app.transport)
        kinds.append(client._fetch_max_wait_ms)
        await client.stop()
        app.output.close(timeout=1.0)
        return kinds

    built, changed = {}, {}
    for kind, fast_path in (("fast", True), ("stock", False)):  # compared after each: nothing is undone between
        built[kind] = asyncio.run(build(fast_path))
        changed[kind] = changes(before, snapshot())
    # The check itself: a class patched the way the worker used to be is noticed.
    from mode.utils.queues import FlowControlEvent
    original = FlowControlEvent.resume
    FlowControlEvent.resume = lambda self: None
    patched = changes(before, snapshot())
    FlowControlEvent.resume = original
    print(json.dumps({"built": built, "changed": changed, "control": patched}))
''')


def test_building_the_worker_app_changes_no_attribute_of_faust_mode_or_aiokafka(model_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SNAPSHOT_MODEL_DIR": str(model_dir)}
    done = subprocess.run([sys.executable, "-c", SNAPSHOT_SCRIPT], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["changed"] == {"fast": [], "stock": []}
    assert "mode.utils.queues:FlowControlEvent.resume" in result["control"]  # the snapshot would see a patch
    # ...and the app is built from the project's classes (fast path) or Faust's (fast path off).
    ours, driver = "stream_detector.kafka.faust_fastpath.", "faust.transport.drivers.aiokafka."
    flow = "stream_detector.kafka.faust_fixes.RebalanceSafeFlowControl"
    assert result["built"]["fast"] == [ours + "FastTransport", ours + "FastConsumer", ours + "Producer",
                                       ours + "NoWaitProducerBuffer", flow, False, 20]
    # Without the fast path: Faust's delivery, producer and monitor; only the consumer thread's fetch
    # wait (the setting's 20 ms) is the project's.
    assert result["built"]["stock"] == [ours + "Transport", ours + "Consumer", driver + "Producer",
                                        "faust.transport.producer.ProducerBuffer", flow, True, 20]


def _app(**settings):
    return faust_app.DetectorApp(f"classes-{time.time_ns()}", broker="kafka://127.0.0.1:9", store="memory://",
                                 web_enabled=False, loghandlers=[], **settings)


def test_the_fast_path_off_with_fausts_fetch_wait_builds_fausts_own_transport_consumer_and_producer():
    import asyncio

    from faust.transport.drivers import aiokafka as driver
    from faust.transport.producer import ProducerBuffer

    async def main():
        app = _app(consumer_fast_path=False, consumer_fetch_max_wait_ms=1500)
        return (type(app.transport), type(app.consumer), type(app.producer), type(app.producer.buffer),
                type(app.consumer._thread), type(app.flow_control))

    assert asyncio.run(main()) == (driver.Transport, driver.Consumer, driver.Producer, ProducerBuffer,
                                   driver.AIOKafkaConsumerThread, RebalanceSafeFlowControl)


def test_the_fast_path_off_with_another_fetch_wait_changes_only_the_consumer_thread():
    import asyncio

    from faust.transport.drivers import aiokafka as driver

    async def main():
        app = _app(consumer_fast_path=False, consumer_fetch_max_wait_ms=20)
        consumer = app.consumer
        return (type(app.transport), type(consumer), type(consumer._thread), type(app.producer),
                type(consumer)._drain_messages, type(consumer)._wait_next_records, type(consumer).on_buffer_drop)

    assert asyncio.run(main()) == (
        faust_fastpath.Transport, faust_fastpath.Consumer, faust_fastpath.FetchWaitConsumerThread, driver.Producer,
        driver.Consumer._drain_messages, driver.Consumer._wait_next_records, driver.Consumer.on_buffer_drop)


def test_an_untested_faust_streaming_or_mode_streaming_is_refused_naming_the_versions_it_takes():
    from importlib.metadata import version

    def installed(faust_version: str, mode_version: str):
        return lambda name: {"faust-streaming": faust_version, "mode-streaming": mode_version}.get(name) or version(name)

    faust_app.check_versions(installed("0.15.3", "0.7.1"))  # the tested ones: no error
    with pytest.raises(UnsupportedDependency, match=r"faust-streaming 0\.16\.0 \(tested: 0\.15\.3\)") as refused:
        faust_app.check_versions(installed("0.16.0", "0.7.1"))
    assert "mode-streaming" not in str(refused.value).split("tested only on the versions named:")[1].split(".")[0]
    with pytest.raises(UnsupportedDependency, match=r"mode-streaming 0\.8\.0 \(tested: 0\.7\.1\)"):
        faust_app.check_versions(installed("0.15.3", "0.8.0"))


def test_the_worker_refuses_to_start_on_an_untested_faust_streaming_with_exit_status_2(tmp_path, model_dir):
    # A distribution record ahead of the installed one on the path: importlib.metadata reports its version.
    info = tmp_path / "faust_streaming-0.16.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: faust-streaming\nVersion: 0.16.0\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
           "STREAM_DETECTOR_MODEL_DIR": str(model_dir), "STREAM_DETECTOR_BOOTSTRAP_SERVERS": "127.0.0.1:9",
           "STREAM_DETECTOR_METRICS_PORT": "0"}
    done = subprocess.run([sys.executable, "-m", "stream_detector", "worker"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=env)
    assert done.returncode == 2
    output = done.stdout + done.stderr
    assert "cannot start" in output and "faust-streaming 0.16.0 (tested: 0.15.3)" in output
    assert "Traceback" not in output


def test_the_faust_transports_entry_point_names_the_fast_transport():
    from mode.utils.imports import symbol_by_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    target = project["entry-points"]["faust.transports"]["stream-detector"]
    assert symbol_by_name(target) is faust_fastpath.FastTransport
