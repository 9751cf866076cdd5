"""Dense autoencoder: the whole window flattened, squeezed through a small latent, and back.

The simplest member of the autoencoder family and the fastest to score. It has no notion of time
order beyond the position of each value in the flattened window, which is enough for short windows
of strongly coupled channels. Scored like the LSTM autoencoder: the error of the newest
``score_steps`` events, each feature in units of its typical training error.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import AnomalyModel, newest_steps_error, register


@register
class DenseAutoencoder(AnomalyModel):
    kind = "dense_ae"

    def __init__(self, n_features: int, window: int, hidden: int = 128, latent: int = 16, score_steps: int = 1,
                 dropout: float = 0.0):
        super().__init__(n_features, window)
        if not 1 <= score_steps <= window:
            raise ValueError("score_steps must be within 1..window")
        self.hidden, self.latent, self.score_steps, self.dropout = hidden, latent, score_steps, float(dropout)
        size = window * n_features
        self.encoder = nn.Sequential(
            nn.Flatten(), nn.Linear(size, hidden), nn.ReLU(), nn.Dropout(self.dropout),
            nn.Linear(hidden, hidden // 2), nn.ReLU(), nn.Linear(hidden // 2, latent),
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent, hidden // 2), nn.ReLU(), nn.Linear(hidden // 2, hidden), nn.ReLU(),
            nn.Linear(hidden, size),
        )

    def config(self) -> dict[str, Any]:
        return {"n_features": self.n_features, "window": self.window, "hidden": self.hidden, "latent": self.latent,
                "score_steps": self.score_steps, "dropout": self.dropout}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x)).view(x.shape)

    def training_loss(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        target = x if target is None else target
        return torch.mean((self(x) - target) ** 2)

    def raw_feature_errors(self, x: torch.Tensor) -> torch.Tensor:
        return newest_steps_error(self(x), x, self.score_steps)
