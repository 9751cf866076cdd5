"""1-D convolutional autoencoder: convolutions over time, channels = features.

Two strided convolutions halve the time axis twice (the SKAB benchmark's Conv-AE shape), two
transposed convolutions restore it. Windows whose length is not a multiple of 4 are padded on the
old side by repeating the oldest event, and the output is cropped back, so any window length
works. Scored like the other autoencoders: the error of the newest ``score_steps`` events, each
feature in units of its typical training error.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import AnomalyModel, newest_steps_error, register


@register
class ConvAutoencoder(AnomalyModel):
    kind = "conv_ae"

    def __init__(self, n_features: int, window: int, hidden: int = 32, latent: int = 16, kernel: int = 7,
                 score_steps: int = 1, dropout: float = 0.0):
        super().__init__(n_features, window)
        if not 1 <= score_steps <= window:
            raise ValueError("score_steps must be within 1..window")
        if kernel < 3 or kernel % 2 == 0:
            raise ValueError("kernel must be odd and at least 3")
        self.hidden, self.latent, self.kernel = hidden, latent, kernel
        self.score_steps, self.dropout = score_steps, float(dropout)
        pad = kernel // 2
        self.padded = -(-window // 4) * 4
        self.encoder = nn.Sequential(
            nn.Conv1d(n_features, hidden, kernel, stride=2, padding=pad), nn.ReLU(), nn.Dropout(self.dropout),
            nn.Conv1d(hidden, latent, kernel, stride=2, padding=pad), nn.ReLU(),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose1d(latent, latent, kernel, stride=2, padding=pad, output_padding=1), nn.ReLU(),
            nn.Dropout(self.dropout),
            nn.ConvTranspose1d(latent, hidden, kernel, stride=2, padding=pad, output_padding=1), nn.ReLU(),
            nn.Conv1d(hidden, n_features, kernel, padding=pad),
        )

    def config(self) -> dict[str, Any]:
        return {"n_features": self.n_features, "window": self.window, "hidden": self.hidden, "latent": self.latent,
                "kernel": self.kernel, "score_steps": self.score_steps, "dropout": self.dropout}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.transpose(1, 2)  # (B, F, W)
        extra = self.padded - self.window
        if extra:
            h = F.pad(h, (extra, 0), mode="replicate")
        out = self.decoder(self.encoder(h))[:, :, extra:]
        return out.transpose(1, 2)

    def training_loss(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        target = x if target is None else target
        return torch.mean((self(x) - target) ** 2)

    def raw_feature_errors(self, x: torch.Tensor) -> torch.Tensor:
        return newest_steps_error(self(x), x, self.score_steps)
