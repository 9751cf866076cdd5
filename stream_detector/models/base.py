"""The interface every servable model implements, and the registry the artifact loader uses."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn


class AnomalyModel(nn.Module):
    """A model that scores scaled windows (B, W, F).

    ``anomaly_scores`` returns one score per window (higher = more anomalous) and per-feature
    contributions (B, F) used to explain alerts. ``training_loss`` is what the trainer minimises.
    ``error_scale`` (F,) is set by the trainer from training data so that every feature's error is
    in comparable units; it is saved with the weights.
    """

    kind: ClassVar[str]

    def __init__(self, n_features: int, window: int):
        super().__init__()
        self.n_features = n_features
        self.window = window
        self.register_buffer("error_scale", torch.ones(n_features))

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Constructor arguments, stored in the artifact metadata."""

    @abstractmethod
    def training_loss(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Loss on input ``x``; ``target`` is the clean window when ``x`` was corrupted on purpose."""

    @abstractmethod
    def raw_feature_errors(self, x: torch.Tensor) -> torch.Tensor:
        """Per-feature errors (B, F) before ``error_scale`` is applied."""

    def anomaly_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        per_feature = self.raw_feature_errors(x) / self.error_scale
        return per_feature.mean(dim=1), per_feature


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
