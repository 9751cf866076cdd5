"""The interface every servable model implements, and the registry the artifact loader uses.

The worker only ever calls :meth:`AnomalyModel.anomaly_scores` on scaled windows (B, W, F), in
eval mode under ``torch.inference_mode``; it must be deterministic there. The trainer drives the
rest of the interface:

- :meth:`configure_optimizers` and :meth:`training_step`: one optimisation step on a batch. The
  default is the autoencoder family's: minimise :meth:`training_loss` (input possibly corrupted on
  purpose, target the clean window). Adversarial or supervised models override it.
- :meth:`validation_loss`: what early stopping watches (lower is better).
- :meth:`calibrate`: once after training, on scaled normal training windows; the default sets
  ``error_scale`` so that every feature's error is in units of its typical training error.

Class flags tell the trainer how to feed a model: ``supervised`` models are trained on labelled
windows of both classes (the label of a window is the label of its newest event); the others on
normal windows only. ``denoising`` models get inputs corrupted by the trainer's fault-shaped noise
and are asked to give back the clean window.
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterable

import torch
from torch import nn

GRAD_CLIP = 5.0


class AnomalyModel(nn.Module):
    """A model that scores scaled windows (B, W, F).

    ``anomaly_scores`` returns one score per window (higher = more anomalous) and per-feature
    contributions (B, F) used to explain alerts. ``training_loss`` is what the autoencoder family
    minimises. ``error_scale`` (F,) is set by :meth:`calibrate` from training data so that every
    feature's error is in comparable units; it is saved with the weights.
    """

    kind: ClassVar[str]
    supervised: ClassVar[bool] = False
    denoising: ClassVar[bool] = True

    def __init__(self, n_features: int, window: int):
        super().__init__()
        self.n_features = n_features
        self.window = window
        self.register_buffer("error_scale", torch.ones(n_features))

    def config(self) -> dict[str, Any]:
        """Constructor arguments, stored in the artifact metadata."""
        raise NotImplementedError

    def training_loss(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Loss on input ``x``; ``target`` is the clean window when ``x`` was corrupted on purpose."""
        raise NotImplementedError(f"{self.kind} has no plain reconstruction loss; use training_step")

    def raw_feature_errors(self, x: torch.Tensor) -> torch.Tensor:
        """Per-feature errors (B, F) before ``error_scale`` is applied."""
        raise NotImplementedError

    def anomaly_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        per_feature = self.raw_feature_errors(x) / self.error_scale
        return per_feature.mean(dim=1), per_feature

    def window_scores(self, x: torch.Tensor) -> torch.Tensor:
        """The scores of :meth:`anomaly_scores` alone; kinds whose explanations are costly skip them."""
        return self.anomaly_scores(x)[0]

    # --- training interface (the trainer's side; the worker never calls these) ---

    def configure_optimizers(self, learning_rate: float) -> list[torch.optim.Optimizer]:
        """Optimisers in a fixed order; the first one's learning rate follows the plateau schedule."""
        return [torch.optim.Adam(self.parameters(), lr=learning_rate)]

    def training_step(self, x: torch.Tensor, target: torch.Tensor, labels: torch.Tensor | None,
                      optimizers: list[torch.optim.Optimizer]) -> dict[str, float]:
        """One optimisation step on a batch; returns named losses (``loss`` is the one reported)."""
        (optimizer,) = optimizers
        loss = self.training_loss(x, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters(), GRAD_CLIP)
        optimizer.step()
        return {"loss": float(loss.detach())}

    def validation_loss(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Held-out loss for early stopping (eval mode, no grad). Lower is better."""
        return self.training_loss(x)

    @torch.no_grad()
    def calibrate(self, batches: Iterable[torch.Tensor]) -> dict[str, Any]:
        """Fits score units on scaled normal training windows; returns what to record in metadata."""
        errors = torch.cat([self.raw_feature_errors(x) for x in batches])
        self.error_scale.copy_(errors.mean(dim=0).clamp_min(1e-6))
        return {"error_scale": [round(float(v), 6) for v in self.error_scale]}


MODEL_KINDS: dict[str, type[AnomalyModel]] = {}


def register(cls: type[AnomalyModel]) -> type[AnomalyModel]:
    MODEL_KINDS[cls.kind] = cls
    return cls


def build_model(kind: str, config: dict[str, Any]) -> AnomalyModel:
    try:
        cls = MODEL_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(sorted(MODEL_KINDS))}") from None
    return cls(**config)


def newest_steps_error(recon: torch.Tensor, x: torch.Tensor, steps: int) -> torch.Tensor:
    """Mean squared error per feature (B, F) over the newest ``steps`` events of the window."""
    return ((recon[:, -steps:, :] - x[:, -steps:, :]) ** 2).mean(dim=1)
