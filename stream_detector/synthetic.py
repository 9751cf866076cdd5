"""Labelled synthetic event streams for the demo, the tests and quick training runs.

Each key has its own stable personality (derived from the key's name, so a model trained on one
run knows the fleet of another), and a seed drives the noise and the injected anomalies. Every
event carries ``label`` (1 = injected anomaly) and ``anomaly`` (its kind) at the top level of the
JSON object; the worker ignores both.

- ``sensors``: 8 channels named after the SKAB testbed; coupled sinusoids with noise. Anomalies:
  spikes, level shifts and drifts on one to three channels.
- ``transactions``: customers with their own spending level, pace, daytime habits and home
  terminals. Anomalies: amounts several times the customer's level, and bursts of rapid
  transactions at unfamiliar terminals at night.
"""

from __future__ import annotations

import heapq
import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

SENSOR_CHANNELS = (
    "Accelerometer1RMS",
    "Accelerometer2RMS",
    "Current",
    "Pressure",
    "Temperature",
    "Thermocouple",
    "Voltage",
    "VolumeFlowRateRMS",
)
BASE_TIME = 1_767_225_600.0  # 2026-01-01T00:00:00Z
_NOISE = 0.05


@dataclass(frozen=True)
class LabelledEvent:
    key: str
    event_id: str
    timestamp: float
    fields: dict[str, Any]
    label: int
    anomaly: str | None = None

    def to_message(self) -> dict[str, Any]:
        return {"key": self.key, "event_id": self.event_id, "timestamp": self.timestamp,
                "fields": self.fields, "label": self.label, "anomaly": self.anomaly}


def _key_rng(key: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(key.encode()))


def sensor_key_stream(key: str, n_events: int, rng: np.random.Generator, anomaly_rate: float = 0.0,
                      warmup: int = 48, start: float = BASE_TIME, run: str = "r") -> list[LabelledEvent]:
    """One device's readings, one per second."""
    personal = _key_rng(key)
    n_ch = len(SENSOR_CHANNELS)
    offset = personal.uniform(-2.0, 2.0, n_ch)
    amp = personal.uniform(0.5, 1.5, n_ch)
    period = personal.uniform(20.0, 90.0, n_ch)
    phase = personal.uniform(0.0, 2 * math.pi, n_ch)  # a device's physics is the same in every run
    t = np.arange(n_events, dtype=np.float64) + float(rng.integers(0, 100_000))  # where in its cycle a run starts
    base = np.sin(2 * math.pi * t[:, None] / period[None, :] + phase[None, :])
    coupled = base.copy()
    coupled[:, 1::2] = 0.6 * base[:, 1::2] + 0.4 * base[:, 0::2]  # odd channels follow their neighbour
    values = offset + amp * coupled + rng.normal(0.0, _NOISE, (n_events, n_ch)) * amp
    labels = np.zeros(n_events, dtype=np.int64)
    kinds: list[str | None] = [None] * n_events
    if anomaly_rate > 0:
        i = warmup
        while i < n_events:
            # Start an incident with a probability that makes ~anomaly_rate of events anomalous.
            if rng.random() < anomaly_rate / 4.0:
                kind = str(rng.choice(["spike", "level_shift", "drift"]))
                length = 1 if kind == "spike" else int(rng.integers(3, 9))
                end = min(i + length, n_events)
                channels = rng.choice(n_ch, size=int(rng.integers(1, 4)), replace=False)
                sign = rng.choice([-1.0, 1.0], size=len(channels))
                if kind == "spike":
                    delta = rng.uniform(3.0, 6.0, len(channels))[None, :] * np.ones((end - i, 1))
                elif kind == "level_shift":
                    delta = rng.uniform(2.0, 3.5, len(channels))[None, :] * np.ones((end - i, 1))
                else:
                    delta = np.linspace(1.5, 3.5, end - i)[:, None] * np.ones((1, len(channels)))
                values[i:end, channels] += sign * delta * amp[channels]
                labels[i:end] = 1
                for j in range(i, end):
                    kinds[j] = kind
                i = end + int(rng.integers(10, 40))  # incidents do not overlap
            else:
                i += 1
    return [
        LabelledEvent(key, f"{key}-{run}-{j}", start + float(j),
                      {name: round(float(v), 5) for name, v in zip(SENSOR_CHANNELS, values[j])},
                      int(labels[j]), kinds[j])
        for j in range(n_events)
    ]


def transaction_key_stream(key: str, n_events: int, rng: np.random.Generator, anomaly_rate: float = 0.0,
                           warmup: int = 24, start: float = BASE_TIME, run: str = "r",
                           n_terminals: int = 5000) -> list[LabelledEvent]:
    """One customer's transactions over days: own level, pace, waking hours and home terminals."""
    personal = _key_rng(key)
    level = personal.uniform(10.0, 120.0)
    per_day = personal.uniform(2.0, 6.0)
    wake = personal.uniform(7.0, 10.0)
    home = personal.integers(0, n_terminals, size=6)
    events: list[LabelledEvent] = []
    t = start + rng.uniform(0, 86_400)
    j = 0
    burst_left = 0
    while j < n_events:
        label, kind = 0, None
        if burst_left > 0:
            burst_left -= 1
            t += rng.uniform(5.0, 90.0)
            amount = level * rng.uniform(1.5, 4.0)
            terminal = int(rng.integers(0, n_terminals))
            label, kind = 1, "burst"
        else:
            t += rng.exponential(86_400.0 / per_day)
            hour = ((t % 86_400.0) / 3600.0)
            if not (wake <= hour <= wake + 14.0):  # asleep: move to the next morning
                t += ((wake - hour) % 24.0) * 3600.0 + rng.uniform(0, 3 * 3600.0)
            amount = max(rng.normal(level, level * 0.3), 1.0)
            terminal = int(rng.choice(home))
            if j >= warmup and anomaly_rate > 0 and rng.random() < anomaly_rate:
                if rng.random() < 0.5:
                    amount = level * rng.uniform(5.0, 10.0)
                    label, kind = 1, "large_amount"
                else:
                    # A card used at night at an unknown terminal, then again within seconds.
                    night = (3.0 + rng.uniform(0, 2.0)) * 3600.0
                    t = t - (t % 86_400.0) + 86_400.0 + night
                    amount = level * rng.uniform(1.5, 4.0)
                    terminal = int(rng.integers(0, n_terminals))
                    label, kind = 1, "burst"
                    burst_left = int(rng.integers(1, 4))
        events.append(LabelledEvent(key, f"{key}-{run}-{j}", round(t, 3),
                                    {"amount": round(float(amount), 2), "terminal_id": f"T{terminal:05d}"},
                                    label, kind))
        j += 1
    return events


def generate(profile: str, n_keys: int, events_per_key: int, anomaly_rate: float = 0.0, seed: int = 0,
             key_prefix: str | None = None) -> list[LabelledEvent]:
    """All keys' streams merged in timestamp order, as they would arrive."""
    rng = np.random.default_rng(seed)
    run = f"s{seed}"
    if profile == "sensors":
        prefix = key_prefix or "device"
        streams = [sensor_key_stream(f"{prefix}-{k:04d}", events_per_key, rng, anomaly_rate, run=run)
                   for k in range(n_keys)]
    elif profile == "transactions":
        prefix = key_prefix or "customer"
        streams = [transaction_key_stream(f"{prefix}-{k:05d}", events_per_key, rng, anomaly_rate, run=run)
                   for k in range(n_keys)]
    else:
        raise ValueError(f"unknown profile {profile!r}; known: sensors, transactions")
    return list(heapq.merge(*streams, key=lambda e: e.timestamp))


def generate_runs(profile: str, n_keys: int, events_per_key: int, runs: int, seed: int = 0,
                  anomaly_rate: float = 0.0) -> list[LabelledEvent]:
    """Several independent runs of the same fleet, each key of each run a stream of its own.

    Training data for synthetic demos: many short runs starting at random points of each device's
    cycle cover its normal behaviour far better than one long run.
    """
    out: list[LabelledEvent] = []
    for r in range(runs):
        for e in generate(profile, n_keys, events_per_key, anomaly_rate, seed=seed + r):
            out.append(LabelledEvent(f"{e.key}#run{r}", e.event_id, e.timestamp, e.fields, e.label, e.anomaly))
    out.sort(key=lambda e: e.timestamp)
    return out
