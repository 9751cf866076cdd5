"""Model definitions shared by the trainer and the worker.

Every kind registers itself with :func:`base.register` on import; the artifact loader builds them
by name. See each module's docstring for how it is trained and scored.

Kinds from other packages register through the ``stream_detector.models`` entry point group: the
entry point's name is the kind, its value an :class:`AnomalyModel` subclass
(``my_kind = my_package.models:MyModel``). They are read on import and again when an artifact
names a kind not known yet, so a package installed later is served without a change here.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from typing import Any

from .base import MODEL_KINDS, AnomalyModel
from .base import build_model as _build_registered
from . import lstm_autoencoder  # noqa: F401  (registers lstm_ae)
from . import dense_autoencoder  # noqa: F401  (registers dense_ae)
from . import conv_autoencoder  # noqa: F401  (registers conv_ae)
from . import lstm_vae  # noqa: F401  (registers lstm_vae)
from . import gan  # noqa: F401  (registers gan_ae)
from . import classifier  # noqa: F401  (registers lstm_classifier)

ENTRY_POINT_GROUP = "stream_detector.models"
BUILTIN_KINDS = frozenset(MODEL_KINDS)
log = logging.getLogger(__name__)


def load_entry_point_kinds() -> dict[str, str]:
    """Registers the model kinds other packages declare; returns the problems met, by entry point.

    A broken plug-in never stops the worker from serving the built-in kinds: it is logged and
    left out. A plug-in cannot replace a built-in kind.
    """
    problems: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in BUILTIN_KINDS:
            problems[ep.name] = "a built-in kind cannot be replaced"
        else:
            try:
                cls = ep.load()
                if not (isinstance(cls, type) and issubclass(cls, AnomalyModel)):
                    raise TypeError(f"{ep.value} is not an AnomalyModel subclass")
                if getattr(cls, "kind", None) != ep.name:
                    raise ValueError(f"{ep.value}.kind is {getattr(cls, 'kind', None)!r}, not {ep.name!r}")
            except Exception as exc:  # a plug-in's own bug: report it, keep the others
                problems[ep.name] = f"{type(exc).__name__}: {exc}"
            else:
                MODEL_KINDS[ep.name] = cls
                continue
        log.error("model kind %r from entry point %s not registered: %s", ep.name, ep.value, problems[ep.name])
    return problems


def build_model(kind: str, config: dict[str, Any]) -> AnomalyModel:
    """Builds a registered kind; an unknown one is looked up among the entry points first."""
    if kind not in MODEL_KINDS:
        load_entry_point_kinds()
    return _build_registered(kind, config)


load_entry_point_kinds()

__all__ = ["ENTRY_POINT_GROUP", "MODEL_KINDS", "AnomalyModel", "build_model", "load_entry_point_kinds"]
