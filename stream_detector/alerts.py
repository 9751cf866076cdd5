"""Alerts: what a subscriber of the alerts topic receives.

One JSON object per message, keyed by the event key (schema in ``schemas/alert.schema.json``).
Messages belong to incidents (see :mod:`stream_detector.incidents`): ``open``, any ``update``\\ s,
then ``close``. Ids are derived from the data, never random: ``incident_id`` from the key and the
incident's first over-threshold event, ``alert_id`` from the key, the newest over-threshold event
the message refers to and its state. Replaying the same events yields the same ids, so consumers
can drop duplicates by ``alert_id``.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np
import orjson

ALERT_SCHEMA_VERSION = 2
_ALERT_NAMESPACE = uuid.UUID("5b0f7a52-8f2e-4d8a-9a57-3c1e2f6a9d10")
_INCIDENT_NAMESPACE = uuid.UUID("0d3c6a8e-41f2-5b7e-9c11-6f2a8b4d7e25")


def alert_id(key: str, event_id: str, state: str = "open") -> str:
    """Id of the ``state`` message whose newest over-threshold window is ``event_id``."""
    return str(uuid.uuid5(_ALERT_NAMESPACE, f"{key}\x1f{event_id}\x1f{state}"))


def incident_id(key: str, first_event_id: str) -> str:
    """Id of the incident of ``key`` whose first over-threshold window is ``first_event_id``."""
    return str(uuid.uuid5(_INCIDENT_NAMESPACE, f"{key}\x1f{first_event_id}"))


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat()


def top_features(feature_names: Sequence[str], feature_errors: np.ndarray,
                 top_k: int = 3) -> tuple[tuple[str, float], ...]:
    """The ``top_k`` largest per-feature errors of one window, largest first, as (feature, error)."""
    return top_features_of_rows(feature_names, np.asarray(feature_errors)[None, :], top_k)[0]


def top_features_of_rows(feature_names: Sequence[str], feature_errors: np.ndarray,
                         top_k: int = 3) -> list[tuple[tuple[str, float], ...]]:
    """:func:`top_features` of each row of a (windows, features) array, sorted in one call."""
    errors = np.asarray(feature_errors)
    order = np.argsort(-errors, axis=1)[:, : max(top_k, 0)]
    values = np.take_along_axis(errors, order, axis=1).tolist()
    return [tuple((feature_names[i], v) for i, v in zip(row, vals)) for row, vals in zip(order.tolist(), values)]


def build_incident_alert(
    *,
    key: str,
    incident_id: str,
    state: str,
    sequence: int,
    event_ids: Sequence[str],
    event_id: str,
    event_timestamp: float,
    score: float,
    threshold: float,
    top_features: Sequence[tuple[str, float]],
    incident: dict[str, Any],
    model_version: str,
    model_kind: str,
    window_size: int = 0,
) -> dict[str, Any]:
    """One message of an incident; ``event_id``, score and features are its newest over-threshold window."""
    summary = dict(incident)
    for name in ("first_event_timestamp", "last_event_timestamp"):
        summary[name] = _iso(summary[name])
    return {
        "schema_version": ALERT_SCHEMA_VERSION,
        "alert_id": alert_id(key, event_id, state),
        "incident_id": incident_id,
        "state": state,
        "sequence": sequence,
        "key": key,
        "event_id": event_id,
        "event_ids": list(event_ids),
        "event_timestamp": _iso(event_timestamp),
        "detected_at": datetime.fromtimestamp(time.time(), tz=timezone.utc).isoformat(),
        "score": float(score),
        "threshold": float(threshold),
        "severity": float(score / threshold) if threshold > 0 else None,
        "model_version": model_version,
        "model_kind": model_kind,
        "window_size": window_size,
        "top_features": [{"feature": name, "error": error} for name, error in top_features],
        "incident": summary,
    }


def build_alert(
    key: str,
    event_id: str,
    event_timestamp: float,
    score: float,
    threshold: float,
    model_version: str,
    model_kind: str,
    feature_names: Sequence[str],
    feature_errors: np.ndarray,
    top_k: int = 3,
    window_size: int = 0,
) -> dict[str, Any]:
    """The ``open`` message of an incident made of this one window (a stand-alone alert)."""
    return build_incident_alert(
        key=key, incident_id=incident_id(key, event_id), state="open", sequence=0, event_ids=[event_id],
        event_id=event_id, event_timestamp=event_timestamp, score=score, threshold=threshold,
        top_features=top_features(feature_names, feature_errors, top_k),
        incident={"first_event_id": event_id, "first_event_timestamp": event_timestamp, "last_event_id": event_id,
                  "last_event_timestamp": event_timestamp, "windows_over": 1, "windows_total": 1,
                  "peak_event_id": event_id, "peak_score": float(score),
                  "peak_severity": float(score / threshold) if threshold > 0 else None, "duration_s": 0.0,
                  "close_reason": None},
        model_version=model_version, model_kind=model_kind, window_size=window_size,
    )


def encode_alert(alert: dict[str, Any]) -> bytes:
    return orjson.dumps(alert)
