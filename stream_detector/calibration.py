"""Each key judged against its own normal: per-key feature scaling learned from the key's warm-up.

One model serves keys that run in different regimes (a pump at flow 32 and 70 degrees, another at
flow 127 and 90 degrees). Scaled with one scaler fitted on all of them, a key's normal readings sit
wherever its regime puts them, and the model's error mixes "this key is in another regime" with
"this key behaves abnormally". :class:`KeyNormal` removes the first part: every feature of a key's
windows is scaled by the key's own centre and spread, learned from its first events, before the
model (and the artifact's global scaler) sees them, identically in the trainer and in the worker.
A key whose values are shifted by a constant and multiplied by a positive factor (per feature) then
gets the same windows, hence the same scores, as the original.

How a key's normal is learned, with no per-event work once it is learned:

- in blocks of ``window`` events: each time a key's event count reaches a multiple of the window
  (``window``, ``2 x window``, ...), the window it holds then (exactly the last block's events) is
  summarised by its per-feature median and robust spread (IQR / 1.349, the standard deviation for a
  feature whose IQR is degenerate);
- the key's centre is the mean of its block medians, its spread the root of the mean squared block
  spread plus the variance of the block medians (the law of total variance over blocks, so a slow
  swing across blocks counts as normal spread). Medians per block keep one short fault in the
  warm-up from moving the centre much;
- after ``blocks`` blocks the key's normal is frozen: an anomaly later on is never learned as normal.
  Windows are scored from the key's first full window on, against the blocks learned so far (the
  trainer does the same, so the model is trained on exactly that);
- a spread is floored at ``rel_floor x |centre|`` (and an absolute floor), so a channel that was
  constant during the warm-up does not turn every later wobble into an extreme value (values are
  clipped by the global scaler anyway).

State per key: the number of blocks learned and three float64 sums per feature, plus the derived
centre and inverse spread (float32), in preallocated arrays grown by doubling, dropped with the
key's window; :meth:`export_key`/:meth:`adopt_key` carry it in the worker's changelog snapshots.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np

_IQR_TO_SIGMA = 1.349
_ABS_FLOOR = 1e-6
_STATE_HEADER = struct.Struct("<ii")  # blocks per key this was learned for, blocks learned


@dataclass(frozen=True)
class KeyNormalConfig:
    """How a key's own normal is learned (stored in the artifact under ``training.key_normal``)."""

    blocks: int = 8  # warm-up blocks of one window each; 0 disables per-key scaling
    rel_floor: float = 1e-3  # a key's spread is at least this share of its centre's magnitude

    def __post_init__(self) -> None:
        if self.blocks < 0 or not self.rel_floor >= 0:
            raise ValueError("key_normal blocks and rel_floor must not be negative")

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
        return cls(blocks=int(record.get("blocks", 0)), rel_floor=float(record.get("rel_floor", 1e-3)))


def block_summary(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature median and robust spread of one block of rows (W, F)."""
    rows = np.asarray(rows, dtype=np.float64)
    q25, median, q75 = np.percentile(rows, [25, 50, 75], axis=0)
    spread = (q75 - q25) / _IQR_TO_SIGMA
    degenerate = spread <= _ABS_FLOOR
    if degenerate.any():
        spread = np.where(degenerate, rows.std(axis=0), spread)
    return median, spread


class KeyNormal:
    """Per-key centre and spread of every feature (see the module docstring)."""

    def __init__(self, n_features: int, window: int, config: KeyNormalConfig,
                 initial_capacity: int = 1024, max_keys: int | None = None):
        if not config.enabled:
            raise ValueError("KeyNormal needs at least one warm-up block")
        self.n_features = n_features
        self.window = window
        self.config = config
        self.blocks = config.blocks
        self.max_keys = max_keys
        self.frozen: set[str] = set()  # keys whose normal is learned: their windows are scaled in bulk
        self._rows: dict[str, int] = {}
        self._free: list[int] = []
        self._capacity = 0
        self._learned = np.zeros(0, dtype=np.int32)
        self._sums = np.zeros((0, 3, n_features), dtype=np.float64)  # sum of medians, of medians^2, of spread^2
        self._center = np.zeros((0, n_features), dtype=np.float32)
        self._inv_scale = np.zeros((0, n_features), dtype=np.float32)
        self._grow(max(min(initial_capacity, max_keys or initial_capacity), 1))

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    @property
    def bytes_per_key(self) -> int:
        return 4 + self.n_features * (3 * 8 + 2 * 4)

    def learned_blocks(self, key: str) -> int:
        row = self._rows.get(key)
        return 0 if row is None else int(self._learned[row])

    def learn_block(self, key: str, block: np.ndarray) -> None:
        """Adds one block of the key's events (its window when its count reached a multiple of W)."""
        if key in self.frozen:
            return
        row = self._rows.get(key)
        if row is None:
            row = self._allocate(key)
        median, spread = block_summary(block)
        sums = self._sums[row]
        sums[0] += median
        sums[1] += median * median
        sums[2] += spread * spread
        self._learned[row] += 1
        self._derive(row)
        if self._learned[row] >= self.blocks:
            self.frozen.add(key)

    def row_of(self, key: str) -> int | None:
        """The key's row once it has learned at least one block."""
        return self._rows.get(key)

    def scale_window(self, key: str, window: np.ndarray) -> None:
        """Scales one window (W, F) in place by the key's normal (the trainer's and warm-up path)."""
        row = self._rows.get(key)
        if row is None:  # cannot happen for a full window: its first block is learned when it fills
            raise KeyError(f"key {key!r} has no learned normal yet")
        window -= self._center[row]
        window *= self._inv_scale[row]

    def scale_rows(self, windows: np.ndarray, rows: np.ndarray) -> None:
        """Scales a batch of windows (B, W, F) in place, window i by the normal in row ``rows[i]``."""
        if len(rows):
            windows -= self._center[rows][:, None, :]
            windows *= self._inv_scale[rows][:, None, :]

    def center_and_scale(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        row = self._rows.get(key)
        if row is None:
            return None
        return self._center[row].copy(), 1.0 / self._inv_scale[row]

    def evict(self, key: str) -> None:
        row = self._rows.pop(key, None)
        if row is not None:
            self._free.append(row)
            self.frozen.discard(key)

    def export_key(self, key: str) -> bytes | None:
        """The key's learned normal (for its changelog snapshot); None for a key with none yet."""
        row = self._rows.get(key)
        if row is None:
            return None
        return _STATE_HEADER.pack(self.blocks, int(self._learned[row])) + self._sums[row].tobytes()

    def adopt_key(self, key: str, blob: bytes) -> bool:
        """Takes over a key's normal from :meth:`export_key`; False when it does not fit (another
        configuration or feature count): the key then learns its normal again."""
        if len(blob) != _STATE_HEADER.size + 3 * self.n_features * 8:
            return False
        blocks, learned = _STATE_HEADER.unpack_from(blob)
        sums = np.frombuffer(blob, dtype=np.float64, offset=_STATE_HEADER.size).reshape(3, self.n_features)
        if blocks != self.blocks or not 0 < learned <= blocks or not np.isfinite(sums).all():
            return False
        row = self._rows.get(key)
        if row is None:
            row = self._allocate(key)
        self._sums[row] = sums
        self._learned[row] = learned
        self._derive(row)
        if learned >= self.blocks:
            self.frozen.add(key)
        else:
            self.frozen.discard(key)
        return True

    def _derive(self, row: int) -> None:
        n = float(self._learned[row])
        sums = self._sums[row]
        center = sums[0] / n
        between = np.maximum(sums[1] / n - center * center, 0.0)
        scale = np.sqrt(sums[2] / n + between)
        floor = np.maximum(self.config.rel_floor * np.abs(center), _ABS_FLOOR)
        scale = np.maximum(scale, floor)
        self._center[row] = center
        self._inv_scale[row] = 1.0 / scale

    def _allocate(self, key: str) -> int:
        if not self._free:
            grown = self._capacity * 2
            if self.max_keys is not None and self._capacity < self.max_keys:
                grown = min(grown, self.max_keys)
            self._grow(max(grown, self._capacity + 1))
        row = self._free.pop()
        self._learned[row] = 0
        self._sums[row] = 0.0
        self._rows[key] = row
        return row

    def _grow(self, capacity: int) -> None:
        old = self._capacity
        if capacity <= old:
            return
        for name in ("_learned", "_sums", "_center", "_inv_scale"):
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
    """Per-key scaling by default for sensor and univariate series; transactions already carry
    per-key relative features (amount against the key's mean, time since its last event)."""
    return 0 if profile_name == "transactions" else KeyNormalConfig().blocks


__all__ = ["KeyNormal", "KeyNormalConfig", "block_summary", "build_key_normal", "default_blocks"]
