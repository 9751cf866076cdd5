"""Model definitions shared by the trainer and the worker.

Every kind registers itself with :func:`base.register` on import; the artifact loader builds them
by name. See each module's docstring for how it is trained and scored.
"""

from .base import MODEL_KINDS, AnomalyModel, build_model
from . import lstm_autoencoder  # noqa: F401  (registers lstm_ae)
from . import dense_autoencoder  # noqa: F401  (registers dense_ae)
from . import conv_autoencoder  # noqa: F401  (registers conv_ae)
from . import lstm_vae  # noqa: F401  (registers lstm_vae)
from . import gan  # noqa: F401  (registers gan_ae)
from . import classifier  # noqa: F401  (registers lstm_classifier)

__all__ = ["MODEL_KINDS", "AnomalyModel", "build_model"]
