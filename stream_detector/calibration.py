"""Each key judged against its own normal: per-key centring (and optionally scaling) of its features.

One model serves keys that run in different regimes (a pump at flow 32 and 70 degrees, another at
flow 127 and 90 degrees). With one scaler fitted on all of them, a key's normal readings sit
wherever its regime puts them, and the model's error mixes "this key is in another regime" with
"this key behaves abnormally". :class:`KeyNormal` removes the first part: every feature of a key's
windows is centred on the key's own level (and, with ``scale``, divided by its own spread) before
the model and the artifact's global scaler see them, identically in the trainer and in the worker.
A key whose values are shifted by a constant per feature then gets the same windows, hence the same
scores, as the original (and, with ``scale``, one multiplied by a positive factor per feature too).

How a key's normal is learned, with no per-event numpy work:

- in blocks of ``window`` events: each time a key's event count reaches a multiple of the window,
  the window it holds then (exactly the last block's events) is summarised by its per-feature median
  and robust spread (IQR / 1.349; the standard deviation where the IQR is degenerate);
- warm-up: over the key's first ``blocks`` blocks, its level is the mean of the block medians and its
  spread the root of the mean squared block spread plus the variance of the block medians;
- after the warm-up the level follows slow drift: at each block it moves ``drift`` of the way towards
  the block's median, each step capped at ``drift_cap`` spreads. A slow drift (a temperature that
  creeps up over hours) is followed; a fault moves the level by at most ``drift x drift_cap`` spreads
  per block, so it stays visible for tens of blocks, and the spread is never re-learned;
- spreads are floored at ``rel_floor x |level|`` (and an absolute floor), so a channel constant during
  the warm-up does not turn every later wobble into an extreme value.

Windows are scaled in bulk per micro-batch; a key's normal changes only at its block boundaries, and
before it changes the windows waiting to be scaled are scaled with the normal they were taken under,
so decisions do not depend on batching. State per key: blocks learned, three float64 sums, level and
spread per feature (float64), and the derived offset and inverse scale (float32), in preallocated
arrays grown by doubling, dropped with the key's window; :meth:`export_key`/:meth:`adopt_key` carry it
in the worker's changelog snapshots.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np

_IQR_TO_SIGMA = 1.349
_ABS_FLOOR = 1e-6
# A snapshot of one key's normal: the configuration it was learned under, blocks learned; then the
# warm-up sums (3 x F), the level (F) and the spread (F), float64.
_STATE_HEADER = struct.Struct("<iiddd?")


@dataclass(frozen=True)
class KeyNormalConfig:
    """How a key's own normal is learned (stored in the artifact under ``training.key_normal``)."""

    blocks: int = 8  # warm-up blocks of one window each; 0 disables per-key normals
    scale: bool = True  # divide by the key's own spread too (else centre only; the global scaler scales)
    drift: float = 0.3  # after the warm-up, the level moves this share of the way to each block's median
    drift_cap: float = 1.0  # ... by at most this many of the key's spreads per block
    rel_floor: float = 1e-3  # a key's spread is at least this share of its level's magnitude

    def __post_init__(self) -> None:
        if self.blocks < 0 or not self.rel_floor >= 0 or not 0 <= self.drift <= 1 or not self.drift_cap >= 0:
            raise ValueError("key_normal needs blocks >= 0, rel_floor >= 0, drift in [0, 1], drift_cap >= 0")

    @property
    def enabled(self) -> bool:
        return self.blocks > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> "KeyNormalConfig":
        """The artifact's setting; artifacts from before it carry none and are served without it."""
        record = (metadata.get("training") or {}).get("key_normal")
        if not isinstance(record, Mapping):
            return cls(blocks=0)
        known = {k: record[k] for k in ("blocks", "scale", "drift", "drift_cap", "rel_floor") if k in record}
        return cls(**known)


def block_summary(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature median and robust spread of one block of rows (W, F).

    Quantiles by one sort and linear interpolation (numpy's default rule), several times cheaper
    than ``np.percentile`` on a block this small: it runs once per W events of every key."""
    ordered = np.sort(np.asarray(rows, dtype=np.float64), axis=0)
    last = len(ordered) - 1

    def quantile(q: float) -> np.ndarray:
        position = q * last
        lo = int(position)
        hi = min(lo + 1, last)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (position - lo)

    median = quantile(0.5)
    spread = (quantile(0.75) - quantile(0.25)) / _IQR_TO_SIGMA
    degenerate = spread <= _ABS_FLOOR
    if degenerate.any():
        spread = np.where(degenerate, ordered.std(axis=0), spread)
    return median, spread


class KeyNormal:
    """Per-key level and spread of every feature (see the module docstring)."""

    def __init__(self, n_features: int, window: int, config: KeyNormalConfig,
                 initial_capacity: int = 1024, max_keys: int | None = None):
        if not config.enabled:
            raise ValueError("KeyNormal needs at least one warm-up block")
        self.n_features = n_features
        self.window = window
        self.config = config
        self.blocks = config.blocks
        self.max_keys = max_keys
        # Windows taken whose scaling is not fixed yet: (position, key row) pairs; :meth:`flush` writes
        # their keys' offsets and inverse scales at those positions of ``target`` (two (B, F) arrays),
        # and runs before any key's normal changes.
        self.target: tuple[np.ndarray, np.ndarray] | None = None
        self.pending: list[int] = []
        self.pending_keys: set[str] = set()  # keys with a window in ``pending``
        self.rows: dict[str, int] = {}  # key -> its row in the arrays below
        self._free: list[int] = []
        self._capacity = 0
        self._learned = np.zeros(0, dtype=np.int32)
        self._sums = np.zeros((0, 3, n_features), dtype=np.float64)  # sum of medians, of medians^2, of spread^2
        self._level = np.zeros((0, n_features), dtype=np.float64)
        self._spread = np.zeros((0, n_features), dtype=np.float64)
        self._cap = np.zeros((0, n_features), dtype=np.float64)  # drift_cap x spread: the largest step per block
        self._offset = np.zeros((0, n_features), dtype=np.float32)
        self._inv_scale = np.zeros((0, n_features), dtype=np.float32)
        self._grow(max(min(initial_capacity, max_keys or initial_capacity), 1))

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    @property
    def bytes_per_key(self) -> int:
        return 4 + self.n_features * (6 * 8 + 2 * 4)

    def learned_blocks(self, key: str) -> int:
        row = self.rows.get(key)
        return 0 if row is None else int(self._learned[row])

    def learn_block(self, key: str, block: np.ndarray) -> None:
        """Takes in one block of the key's events (its window when its count reached a multiple of W)."""
        if key in self.pending_keys:
            self.flush()  # the key's windows taken before this change are scaled as they were taken
        row = self.rows.get(key)
        if row is None:
            row = self._allocate(key)
        config = self.config
        if self._learned[row] < self.blocks:
            median, spread = block_summary(block)
            sums = self._sums[row]
            sums[0] += median
            sums[1] += median * median
            sums[2] += spread * spread
            self._learned[row] += 1
            n = float(self._learned[row])
            level = sums[0] / n
            between = np.maximum(sums[1] / n - level * level, 0.0)
            self._level[row] = level
            self._spread[row] = np.maximum(np.sqrt(sums[2] / n + between),
                                           np.maximum(config.rel_floor * np.abs(level), _ABS_FLOOR))
        elif config.drift > 0:  # the median alone (the spread is not re-learned): one sort, no percentile
            ordered = np.sort(block, axis=0)
            middle = len(ordered) // 2
            median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) * 0.5
            step = median - self._level[row]
            np.clip(step, self._cap[row] * -1.0, self._cap[row], out=step)
            self._level[row] += config.drift * step
        else:
            return
        self._derive(row)

    def row_of(self, key: str) -> int | None:
        """The key's row once it has learned at least one block."""
        return self.rows.get(key)

    def scale_window(self, key: str, window: np.ndarray) -> None:
        """Scales one window (W, F) in place by the key's normal now (the trainer's path)."""
        row = self.rows.get(key)
        if row is None:  # cannot happen for a full window: its first block is learned when it fills
            raise KeyError(f"key {key!r} has no learned normal yet")
        window -= self._offset[row]
        window *= self._inv_scale[row]

    def defer(self, position: int, key: str) -> None:
        """Window ``position`` of :attr:`target` belongs to ``key``: scale it at the next :meth:`flush`."""
        self.pending.append(position)
        self.pending.append(self.rows[key])
        self.pending_keys.add(key)

    def flush(self) -> None:
        """Writes every deferred window's offset and inverse scale (its key's normal now) into
        :attr:`target`, in one numpy pass; the windows themselves are scaled later, off the event
        loop (:meth:`apply`)."""
        if not self.pending:
            return
        pairs = np.asarray(self.pending, dtype=np.int64).reshape(-1, 2)
        self.pending = []
        self.pending_keys.clear()
        assert self.target is not None
        offsets, inv_scales = self.target
        at, rows = pairs[:, 0], pairs[:, 1]
        offsets[at] = self._offset[rows]
        inv_scales[at] = self._inv_scale[rows]

    @staticmethod
    def apply(windows: np.ndarray, offsets: np.ndarray, inv_scales: np.ndarray) -> None:
        """Scales windows (B, W, F) in place by per-window offsets and inverse scales (B, F)."""
        windows -= offsets[:, None, :]
        windows *= inv_scales[:, None, :]

    def level_and_spread(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        row = self.rows.get(key)
        if row is None:
            return None
        return self._level[row].copy(), self._spread[row].copy()

    def evict(self, key: str) -> None:
        if self.pending:
            self.flush()  # the row may be reused by another key before the batch ends
        row = self.rows.pop(key, None)
        if row is not None:
            self._free.append(row)

    def export_key(self, key: str) -> bytes | None:
        """The key's learned normal (for its changelog snapshot); None for a key with none yet."""
        row = self.rows.get(key)
        if row is None:
            return None
        c = self.config
        return (_STATE_HEADER.pack(self.blocks, int(self._learned[row]), c.drift, c.drift_cap, c.rel_floor, c.scale)
                + self._sums[row].tobytes() + self._level[row].tobytes() + self._spread[row].tobytes())

    def adopt_key(self, key: str, blob: bytes) -> bool:
        """Takes over a key's normal from :meth:`export_key`; False when it does not fit (another
        configuration or feature count): the key then learns its normal again."""
        f = self.n_features
        if len(blob) != _STATE_HEADER.size + 5 * f * 8:
            return False
        blocks, learned, drift, drift_cap, rel_floor, scale = _STATE_HEADER.unpack_from(blob)
        c = self.config
        if (blocks, drift, drift_cap, rel_floor, scale) != (self.blocks, c.drift, c.drift_cap, c.rel_floor, c.scale):
            return False
        values = np.frombuffer(blob, dtype=np.float64, offset=_STATE_HEADER.size).reshape(5, f)
        if not 0 < learned <= blocks or not np.isfinite(values).all() or not (values[4] > 0).all():
            return False
        if self.pending:
            self.flush()
        row = self.rows.get(key)
        if row is None:
            row = self._allocate(key)
        self._sums[row] = values[:3]
        self._level[row] = values[3]
        self._spread[row] = values[4]
        self._learned[row] = learned
        self._derive(row)
        return True

    def _derive(self, row: int) -> None:
        self._cap[row] = self.config.drift_cap * self._spread[row]
        self._offset[row] = self._level[row]
        self._inv_scale[row] = 1.0 / self._spread[row] if self.config.scale else 1.0

    def _allocate(self, key: str) -> int:
        if not self._free:
            grown = self._capacity * 2
            if self.max_keys is not None and self._capacity < self.max_keys:
                grown = min(grown, self.max_keys)
            self._grow(max(grown, self._capacity + 1))
        row = self._free.pop()
        self._learned[row] = 0
        self._sums[row] = 0.0
        self.rows[key] = row
        return row

    def _grow(self, capacity: int) -> None:
        old = self._capacity
        if capacity <= old:
            return
        for name in ("_learned", "_sums", "_level", "_spread", "_cap", "_offset", "_inv_scale"):
            array = getattr(self, name)
            grown = np.zeros((capacity,) + array.shape[1:], dtype=array.dtype)
            grown[:old] = array
            setattr(self, name, grown)
        self._free.extend(range(capacity - 1, old - 1, -1))
        self._capacity = capacity


def build_key_normal(metadata: Mapping[str, Any], n_features: int, window: int,
                     max_keys: int | None = None) -> KeyNormal | None:
    """The per-key normal an artifact is served with (None when it was trained without one)."""
    config = KeyNormalConfig.from_metadata(metadata)
    if not config.enabled:
        return None
    return KeyNormal(n_features, window, config, max_keys=max_keys)


def default_blocks(profile_name: str) -> int:
    """Off by default (opt in with ``--key-normal-blocks``): on keys of one operating regime a scaler
    fitted across keys scored better when files were left out (benchmarks/results/detection_cv.md);
    per-key scaling is what keeps a model working on keys in regimes it was not trained on."""
    return 0


__all__ = ["KeyNormal", "KeyNormalConfig", "block_summary", "build_key_normal", "default_blocks"]
