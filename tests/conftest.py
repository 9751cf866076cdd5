"""Shared pytest fixtures: a real local Kafka broker for integration tests."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stream_detector.kafka.local_broker import LocalBroker, ensure_topics
from stream_detector.profiles import SensorProfile
from stream_detector.synthetic import SENSOR_CHANNELS, generate_runs
from trainer.data import from_synthetic
from trainer.fit import TrainConfig, train_and_save

WINDOW = 32  # window of the sensor_model_dir model


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: needs a real local Kafka broker (Java + Maven-fetched jars)"
    )


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """One real single-node KRaft broker for the whole test session."""
    broker = LocalBroker(data_dir=tmp_path_factory.mktemp("kafka"))
    broker.start(timeout=120)
    try:
        yield broker
    finally:
        broker.stop()


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


@pytest.fixture(scope="session")
def sensor_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model trained by the trainer's own code on generated normal sensor data."""
    model_dir = tmp_path_factory.mktemp("models") / "sensors"
    profile = SensorProfile(SENSOR_CHANNELS)
    data = from_synthetic(generate_runs("sensors", 20, 200, runs=5, seed=1000), profile)
    config = TrainConfig(window=WINDOW, hidden=64, latent=32, epochs=40, seed=0, threads=2)
    train_and_save(data.events, profile, config, model_dir, labels=data.labels, progress=False)
    return model_dir
