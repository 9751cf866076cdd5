"""Preprocessing shared by trainer and worker: imputation, robust scaling, clipping.

Fitted once on training features and stored in the model artifact as plain numbers. At scoring
time it runs as a torch module on the model's device, so a micro-batch is scaled where it is
scored, with no extra host pass.

- Missing values (NaN) are imputed with the training median, i.e. 0 after scaling.
- Scaling is robust: (x - median) / (IQR / 1.349), so a few extreme training values cannot
  squash the normal range; a floor keeps near-constant features from exploding.
- Scaled values are clipped to +-``clip`` so one absurd input cannot dominate a window's error
  (it still scores as extreme: the clip sits far beyond the normal range).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

_IQR_TO_SIGMA = 1.349
_MIN_SCALE = 1e-3


@dataclass(frozen=True)
class ScalerParams:
    center: tuple[float, ...]
    scale: tuple[float, ...]
    clip: float = 10.0

    @classmethod
    def fit(cls, features: np.ndarray, clip: float = 10.0) -> "ScalerParams":
        """Fits on rows of shape (N, F) (windows can be flattened to rows first)."""
        rows = np.asarray(features, dtype=np.float64).reshape(-1, features.shape[-1])
        center = np.nanmedian(rows, axis=0)
        q75, q25 = np.nanpercentile(rows, [75, 25], axis=0)
        scale = (q75 - q25) / _IQR_TO_SIGMA
        # Features with a degenerate IQR (binary flags, near-constant channels) fall back to std.
        std = np.nanstd(rows, axis=0)
        scale = np.where(scale > _MIN_SCALE, scale, np.maximum(std, _MIN_SCALE))
        center = np.nan_to_num(center)
        return cls(tuple(float(v) for v in center), tuple(float(v) for v in scale), float(clip))

    def to_dict(self) -> dict[str, Any]:
        return {"method": "robust", "center": list(self.center), "scale": list(self.scale), "clip": self.clip}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ScalerParams":
        return cls(tuple(map(float, data["center"])), tuple(map(float, data["scale"])), float(data["clip"]))

    def transform(self, x: np.ndarray) -> np.ndarray:
        """The numpy twin of :class:`Preprocessor`, for baselines that do not run on torch."""
        out = (np.asarray(x, dtype=np.float32) - np.float32(self.center)) / np.float32(self.scale)
        return np.clip(np.nan_to_num(out, nan=0.0), -self.clip, self.clip)


class Preprocessor(nn.Module):
    def __init__(self, params: ScalerParams):
        super().__init__()
        self.params = params
        self.register_buffer("center", torch.tensor(params.center, dtype=torch.float32))
        self.register_buffer("inv_scale", 1.0 / torch.tensor(params.scale, dtype=torch.float32))
        self.clip = float(params.clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.center) * self.inv_scale
        x = torch.nan_to_num(x, nan=0.0)
        return x.clamp_(-self.clip, self.clip)
