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

    Options (all off by default, so the default features stay as they are):

    - ``robust_features``: two more per-key features. ``amount_to_key_median``: the amount relative
      to the median of the key's last ``amount_memory`` amounts (unlike the running mean, a few
      inflated amounts of a compromised card do not move it); ``log_tx_last_day``: log(1 + the
      key's transactions in about the last day), an exponentially decayed count (time constant one
      day) of its previous transactions: the key's pace.
    - ``context_fields``: names of extra numeric event fields copied into the features as they are,
      for context computed upstream that no single key's history holds (e.g. a terminal's share of
      confirmed frauds, known with a delay). Every event must carry them.
    """

    name = "transactions"
    base_features = (
        "log_amount",
        "amount_to_key_mean",
        "log_seconds_since_prev",
        "hour_sin",
        "hour_cos",
        "new_terminal",
    )
    robust_feature_names = ("amount_to_key_median", "log_tx_last_day")

    def __init__(self, amount_field: str = "amount", terminal_field: str = "terminal_id", terminal_memory: int = 16,
                 mean_halflife: float = 16.0, robust_features: bool = False, amount_memory: int = 16,
                 context_fields: Sequence[str] = ()):
        self.amount_field = amount_field
        self.terminal_field = terminal_field
        self.terminal_memory = int(terminal_memory)
        self.mean_halflife = float(mean_halflife)
        self.robust_features = bool(robust_features)
        self.amount_memory = int(amount_memory)
        self.context_fields = tuple(context_fields)
        if self.robust_features and self.amount_memory < 1:
            raise ValueError("amount_memory must be at least 1")
        if len(set(self.context_fields)) != len(self.context_fields) or \
                {amount_field, terminal_field} & set(self.context_fields):
            raise ValueError("context fields must be distinct from each other and from the amount and terminal")
        self._alpha = 1.0 - 0.5 ** (1.0 / self.mean_halflife)
        self.fields = (FieldSpec(amount_field, "number"), FieldSpec(terminal_field, "id")) + tuple(
            FieldSpec(name, "number") for name in self.context_fields)
        self.feature_names = self.base_features + (self.robust_feature_names if self.robust_features else ()) \
            + self.context_fields
        # State: header, terminal ring, then (robust features) the decayed day count and an amount ring.
        self._day_count = _TX_HEADER + self.terminal_memory
        self._amounts = self._day_count + 1
        self.state_size = _TX_HEADER + self.terminal_memory + (1 + self.amount_memory if self.robust_features else 0)

    def featurize(self, values: Sequence[Any], timestamp: float, state: np.ndarray, out: np.ndarray) -> None:
        amount = max(float(values[0]), 0.0)
        terminal = _stable_hash(values[1])
        count = state[_TX_COUNT]
        if count > 0:
            mean = state[_TX_MEAN]
            ratio = amount / (mean + 1.0)
            gap = max(timestamp - state[_TX_LAST_TS], 0.0)
            ring = state[_TX_HEADER:_TX_HEADER + self.terminal_memory]
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
        j = 6
        if self.robust_features:
            amounts = state[self._amounts:self._amounts + self.amount_memory]
            kept = int(min(count, self.amount_memory))
            out[j] = amount / (float(np.median(amounts[:kept])) + 1.0) if kept else 1.0
            day_count = state[self._day_count] * math.exp(-gap / _SECONDS_PER_DAY) if count > 0 else 0.0
            out[j + 1] = math.log1p(day_count)
            state[self._day_count] = day_count + 1.0
            amounts[int(count) % self.amount_memory] = amount
            j += 2
        for i in range(len(self.context_fields)):
            out[j + i] = float(values[2 + i])
        state[_TX_HEADER + int(count) % self.terminal_memory] = terminal
        # Monotone: an old or forged timestamp must not rewind the key's last-seen time (the next
        # in-order event's gap would then span back to it).
        state[_TX_LAST_TS] = max(timestamp, state[_TX_LAST_TS]) if count > 0 else timestamp
        state[_TX_COUNT] = count + 1

    def to_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "name": self.name,
            "amount_field": self.amount_field,
            "terminal_field": self.terminal_field,
            "terminal_memory": self.terminal_memory,
            "mean_halflife": self.mean_halflife,
        }
        if self.robust_features:  # options are written only when used: default artifacts stay as they were
            config.update(robust_features=True, amount_memory=self.amount_memory)
        if self.context_fields:
            config["context_fields"] = list(self.context_fields)
        return config


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
