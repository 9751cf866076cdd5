"""Event profiles: which fields an event carries and how they become model features.

A profile is shared by the trainer and the worker, so the features a model is evaluated on offline
are computed by exactly the code that computes them online. Per-key state a profile needs (the
previous timestamp, a running mean) lives in a small float64 vector owned by the window store,
which keeps memory per key fixed and known.
"""

from __future__ import annotations

import math
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np

FieldKind = Literal["number", "id"]


@dataclass(frozen=True)
class FieldSpec:
    """One named field an event must carry: a finite number, or an identifier (string or integer)."""

    name: str
    kind: FieldKind = "number"


class Profile(ABC):
    """Turns one event's field values into one feature row, updating the key's state."""

    name: str
    fields: tuple[FieldSpec, ...]
    feature_names: tuple[str, ...]
    state_size: int

    @abstractmethod
    def featurize(self, values: Sequence[Any], timestamp: float, state: np.ndarray, out: np.ndarray) -> None:
        """Writes the feature row for an event into ``out``; ``values`` follow ``self.fields``."""

    @abstractmethod
    def to_config(self) -> dict[str, Any]:
        """What the model artifact stores to rebuild this profile."""

    @property
    def n_features(self) -> int:
        return len(self.feature_names)


class SensorProfile(Profile):
    """Multivariate readings of a device: the features are the channels themselves."""

    name = "sensors"

    def __init__(self, channels: Sequence[str]):
        if not channels:
            raise ValueError("the sensors profile needs at least one channel")
        self.channels = tuple(channels)
        self.fields = tuple(FieldSpec(c, "number") for c in self.channels)
        self.feature_names = self.channels
        self.state_size = 0

    def featurize(self, values: Sequence[Any], timestamp: float, state: np.ndarray, out: np.ndarray) -> None:
        out[:] = values

    def to_config(self) -> dict[str, Any]:
        return {"name": self.name, "channels": list(self.channels)}


# Per-key state layout of the transactions profile.
_TX_LAST_TS, _TX_MEAN, _TX_COUNT = 0, 1, 2
_TX_HEADER = 3
_SECONDS_PER_DAY = 86_400.0


class TransactionProfile(Profile):
    """Card transactions keyed by customer (or card, or terminal).

    Besides the amount, the features carry the per-key context that separates fraud from a
    customer's habits: time since the key's previous transaction, hour of day, the amount relative
    to the key's recent mean, and whether the terminal is new among the key's recent terminals.
    """

    name = "transactions"
    feature_names = (
        "log_amount",
        "amount_to_key_mean",
        "log_seconds_since_prev",
        "hour_sin",
        "hour_cos",
        "new_terminal",
    )

    def __init__(self, amount_field: str = "amount", terminal_field: str = "terminal_id", terminal_memory: int = 16,
                 mean_halflife: float = 16.0):
        self.amount_field = amount_field
        self.terminal_field = terminal_field
        self.terminal_memory = int(terminal_memory)
        self.mean_halflife = float(mean_halflife)
        self._alpha = 1.0 - 0.5 ** (1.0 / self.mean_halflife)
        self.fields = (FieldSpec(amount_field, "number"), FieldSpec(terminal_field, "id"))
        self.state_size = _TX_HEADER + self.terminal_memory

    def featurize(self, values: Sequence[Any], timestamp: float, state: np.ndarray, out: np.ndarray) -> None:
        amount = max(float(values[0]), 0.0)
        terminal = _stable_hash(values[1])
        count = state[_TX_COUNT]
        if count > 0:
            mean = state[_TX_MEAN]
            ratio = amount / (mean + 1.0)
            gap = max(timestamp - state[_TX_LAST_TS], 0.0)
            ring = state[_TX_HEADER:]
            seen = int(min(count, self.terminal_memory))
            new_terminal = 0.0 if terminal in ring[:seen] else 1.0
            state[_TX_MEAN] = mean + self._alpha * (amount - mean)
        else:
            ratio, gap, new_terminal = 1.0, _SECONDS_PER_DAY, 1.0
            state[_TX_MEAN] = amount
        hour = (timestamp % _SECONDS_PER_DAY) / _SECONDS_PER_DAY * 2.0 * math.pi
        out[0] = math.log1p(amount)
        out[1] = ratio
        out[2] = math.log1p(gap)
        out[3] = math.sin(hour)
        out[4] = math.cos(hour)
        out[5] = new_terminal
        state[_TX_HEADER + int(count) % self.terminal_memory] = terminal
        state[_TX_LAST_TS] = timestamp
        state[_TX_COUNT] = count + 1

    def to_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "amount_field": self.amount_field,
            "terminal_field": self.terminal_field,
            "terminal_memory": self.terminal_memory,
            "mean_halflife": self.mean_halflife,
        }


def _stable_hash(value: Any) -> float:
    """An identifier as a float64-exact integer (< 2**32), stable across processes."""
    return float(zlib.crc32(str(value).encode("utf-8")))


def profile_from_config(config: dict[str, Any]) -> Profile:
    name = config.get("name")
    if name == SensorProfile.name:
        return SensorProfile(config["channels"])
    if name == TransactionProfile.name:
        options = {k: v for k, v in config.items() if k != "name"}
        return TransactionProfile(**options)
    raise ValueError(f"unknown profile {name!r}; known: sensors, transactions")
