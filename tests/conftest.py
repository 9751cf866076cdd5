"""Shared pytest fixtures: a real local Kafka broker for integration tests."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stream_detector.kafka.local_broker import LocalBroker, ensure_topics
from stream_detector.profiles import SensorProfile
from stream_detector.synthetic import SENSOR_CHANNELS, generate_runs
from trainer.data import from_synthetic
from trainer.fit import TrainConfig, train_and_save

from tcp_proxy import TcpProxy

WINDOW = 32  # window of the sensor_model_dir model


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: needs a real local Kafka broker (Java + Maven-fetched jars)"
    )


@pytest.fixture(scope="session")
def _session_proxy() -> Iterator[TcpProxy]:
    """Bound before the broker starts, so that the port the broker advertises is never taken."""
    proxy = TcpProxy()
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory, _session_proxy: TcpProxy) -> Iterator[LocalBroker]:
    """One real single-node KRaft broker for the whole test session (with a proxied listener, see
    ``broker_proxy``)."""
    broker = LocalBroker(data_dir=tmp_path_factory.mktemp("kafka"), proxy_port=_session_proxy.port)
    _session_proxy.target = broker.proxied_listener_port
    broker.start(timeout=120)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def broker_proxy(kafka_broker: LocalBroker, _session_proxy: TcpProxy) -> Iterator[TcpProxy]:
    """The TCP proxy every client given ``kafka_broker.proxied_bootstrap_servers`` goes through,
    passing traffic; the test may cut or slow it (healed again after the test)."""
    _session_proxy.heal()
    try:
        yield _session_proxy
    finally:
        _session_proxy.heal()


@pytest.fixture
def make_topic(kafka_broker: LocalBroker) -> Callable[..., str]:
    """Factory: ``make_topic(prefix="t", partitions=1)`` creates a fresh, unique topic."""

    def _make(prefix: str = "t", partitions: int = 1) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        ensure_topics(kafka_broker.bootstrap_servers, {name: partitions})
        return name

    return _make


@pytest.fixture
def unique_topic(make_topic: Callable[..., str]) -> str:
    """A fresh single-partition topic on the session broker."""
    return make_topic()


# Trained models are cached by the content of everything that shapes them (the training code, the
# data generator, the configuration), so a second test session on a machine reuses the model
# instead of training it again; any change to that code trains anew. The cache lives outside the
# checkout (a fresh clone on the same machine finds it) and holds only artifacts the trainer wrote.
MODEL_CACHE = Path(os.environ.get("STREAM_DETECTOR_TEST_MODEL_CACHE",
                                  Path.home() / ".cache" / "stream-detector" / "test-models"))
_SHAPING_SOURCES = ("trainer", "stream_detector/models", "stream_detector/preprocessing.py",
                    "stream_detector/profiles.py", "stream_detector/synthetic.py", "stream_detector/artifacts.py",
                    "stream_detector/windows.py", "stream_detector/detector.py", "stream_detector/thresholds.py")


def _content_key(*parts: str) -> str:
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for name in _SHAPING_SOURCES:
        path = root / name
        for source in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(str(source.relative_to(root)).encode())
            digest.update(source.read_bytes())
    for part in parts:
        digest.update(part.encode())
    return digest.hexdigest()[:24]


def cached_model(model_dir: Path, key: str, train: Callable[[Path], object]) -> Path:
    """``model_dir`` filled with the cached artifact for ``key``, trained by ``train`` when missing."""
    cached = MODEL_CACHE / key
    if not cached.is_dir():
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=_ensure(MODEL_CACHE)))
        train(staging / "model")
        try:
            os.rename(staging / "model", cached)  # atomic: another session sees all of it or nothing
        except OSError:
            pass  # another session put it there first
        shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(cached, model_dir)
    return model_dir


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def sensor_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model trained by the trainer's own code on generated normal sensor data."""
    model_dir = tmp_path_factory.mktemp("models") / "sensors"
    profile = SensorProfile(SENSOR_CHANNELS)
    config = TrainConfig(window=WINDOW, hidden=64, latent=32, epochs=40, seed=0, threads=2)

    def train(out: Path) -> None:
        data = from_synthetic(generate_runs("sensors", 20, 200, runs=5, seed=1000), profile)
        train_and_save(data.events, profile, config, out, labels=data.labels, progress=False)

    return cached_model(model_dir, _content_key("sensors", repr(config), repr(SENSOR_CHANNELS)), train)
