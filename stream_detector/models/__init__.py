"""Model definitions shared by the trainer and the worker."""

from .base import MODEL_KINDS, AnomalyModel, build_model
from . import lstm_autoencoder  # noqa: F401  (registers lstm_ae)

__all__ = ["MODEL_KINDS", "AnomalyModel", "build_model"]
