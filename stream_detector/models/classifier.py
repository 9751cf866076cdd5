"""Supervised LSTM classifier, for when labelled anomalies exist (e.g. confirmed fraud).

An LSTM reads the window; its last state, together with the newest event's features, goes through
a small MLP to one logit: is the window's newest event an anomaly? Trained with class-weighted
binary cross-entropy (``pos_weight``, set by the trainer from the label balance: anomalies are
rare), on windows of both classes; the label of a window is the label of its newest event.

Score: ``-log P(normal | window) = softplus(logit)``: a monotone function of the predicted anomaly
probability, non-negative, and unlike the probability itself it does not saturate to 1.0 in
float32, so confident detections keep their ranking.

Per-feature contributions (alerts) are occlusion effects: for each feature, the drop of the logit
when that feature is set to its training median (0 after scaling) throughout the window, floored
at 0. It costs ``F`` extra forward passes per batch, needs no gradients (so it works under
``torch.inference_mode`` and in eval mode on every device), and is deterministic.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import AnomalyModel, register


@register
class LSTMClassifier(AnomalyModel):
    kind = "lstm_classifier"
    supervised = True
    denoising = False

    def __init__(self, n_features: int, window: int, hidden: int = 64, layers: int = 1, pos_weight: float = 1.0,
                 dropout: float = 0.1):
        super().__init__(n_features, window)
        self.hidden, self.layers = hidden, layers
        self.pos_weight, self.dropout = float(pos_weight), float(dropout)
        self.lstm = nn.LSTM(n_features, hidden, num_layers=layers, batch_first=True,
                            dropout=self.dropout if layers > 1 else 0.0)
        self.head = nn.Sequential(
            nn.Linear(hidden + n_features, hidden), nn.ReLU(), nn.Dropout(self.dropout), nn.Linear(hidden, 1),
        )

    def config(self) -> dict[str, Any]:
        return {"n_features": self.n_features, "window": self.window, "hidden": self.hidden, "layers": self.layers,
                "pos_weight": self.pos_weight, "dropout": self.dropout}

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(torch.cat([out[:, -1, :], x[:, -1, :]], dim=1)).squeeze(1)

    def loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weight = torch.tensor(self.pos_weight, device=x.device, dtype=x.dtype)
        return F.binary_cross_entropy_with_logits(self.logits(x), labels.to(x.dtype), pos_weight=weight)

    def training_step(self, x: torch.Tensor, target: torch.Tensor, labels: torch.Tensor | None,
                      optimizers: list[torch.optim.Optimizer]) -> dict[str, float]:
        if labels is None:
            raise ValueError("lstm_classifier is supervised: it needs labelled windows")
        (optimizer,) = optimizers
        loss = self.loss(x, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters(), 5.0)
        optimizer.step()
        return {"loss": float(loss.detach())}

    def validation_loss(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if labels is None:
            raise ValueError("lstm_classifier is supervised: it needs labelled windows")
        return self.loss(x, labels)

    def anomaly_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, f = x.shape[0], self.n_features
        # One call for the window and its F occluded copies: copy j has feature j set to 0 (the median).
        occluded = x.unsqueeze(0).repeat(f + 1, 1, 1, 1)
        idx = torch.arange(f, device=x.device)
        occluded[idx + 1, :, :, idx] = 0.0
        logits = self.logits(occluded.view(-1, self.window, f)).view(f + 1, batch)
        contributions = (logits[0].unsqueeze(0) - logits[1:]).clamp_min(0.0).transpose(0, 1)
        return F.softplus(logits[0]), contributions

    def window_scores(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(self.logits(x))

    @torch.no_grad()
    def calibrate(self, batches) -> dict[str, Any]:
        """Nothing to fit: the score is a probability statement."""
        return {}
