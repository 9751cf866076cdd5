"""LSTM autoencoder: encoder LSTM -> latent vector -> decoder LSTM -> the window, reconstructed.

The decoder emits the window newest-first (the sequence-to-sequence autoencoder of Srivastava et
al.), so the event being judged is decoded right after the latent, where reconstruction is most
precise. The score is the error of the newest ``score_steps`` events of the window, in units of
their typical training error: the window gives context, the score judges the newest event, so one
anomaly raises one alert rather than one per window that still contains it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import AnomalyModel, register


@register
class LSTMAutoencoder(AnomalyModel):
    kind = "lstm_ae"

    def __init__(self, n_features: int, window: int, hidden: int = 64, latent: int = 16, layers: int = 1,
                 score_steps: int = 1):
        super().__init__(n_features, window)
        if not 1 <= score_steps <= window:
            raise ValueError("score_steps must be within 1..window")
        self.hidden, self.latent, self.layers, self.score_steps = hidden, latent, layers, score_steps
        self.encoder = nn.LSTM(n_features, hidden, num_layers=layers, batch_first=True)
        self.to_latent = nn.Linear(hidden, latent)
        self.from_latent = nn.Linear(latent, hidden)
        self.init_state = nn.Linear(latent, 2 * layers * hidden)
        self.decoder = nn.LSTM(hidden, hidden, num_layers=layers, batch_first=True)
        self.output = nn.Linear(hidden, n_features)

    def config(self) -> dict[str, Any]:
        return {"n_features": self.n_features, "window": self.window, "hidden": self.hidden,
                "latent": self.latent, "layers": self.layers, "score_steps": self.score_steps}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._reconstruct(x, x.shape[1])

    def _reconstruct(self, x: torch.Tensor, steps: int) -> torch.Tensor:
        """The newest ``steps`` events of the window, reconstructed, oldest-first."""
        _, (h, _) = self.encoder(x)
        z = self.to_latent(h[-1])
        inputs = self.from_latent(z).unsqueeze(1).expand(-1, steps, -1)
        # The latent also seeds the decoder's state, so its first (newest) step is already informed.
        h0, c0 = torch.tanh(self.init_state(z)).view(-1, 2 * self.layers, self.hidden).transpose(0, 1).chunk(2)
        decoded, _ = self.decoder(inputs, (h0.contiguous(), c0.contiguous()))
        return self.output(decoded).flip(1)  # back to oldest-first

    def training_loss(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        target = x if target is None else target
        return torch.mean((self(x) - target) ** 2)

    def raw_feature_errors(self, x: torch.Tensor) -> torch.Tensor:
        # The decoder runs newest-first and each step depends only on the ones before it, so the
        # newest k events need only its first k steps: the same numbers as decoding the whole
        # window and keeping its last k, at about half the cost (benchmarks/results/throughput.md).
        k = self.score_steps
        return ((self._reconstruct(x, k) - x[:, -k:, :]) ** 2).mean(dim=1)
