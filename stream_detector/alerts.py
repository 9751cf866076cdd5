"""Alerts: what a subscriber of the alerts topic receives.

One JSON object per alert, keyed by the event key (schema in ``schemas/alert.schema.json``). The
alert id is derived from the key and event id, so an event scored twice (after a restart, say)
yields the same id and consumers can drop the duplicate.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np
import orjson

ALERT_SCHEMA_VERSION = 1
_ALERT_NAMESPACE = uuid.UUID("5b0f7a52-8f2e-4d8a-9a57-3c1e2f6a9d10")


def alert_id(key: str, event_id: str) -> str:
    return str(uuid.uuid5(_ALERT_NAMESPACE, f"{key}\x1f{event_id}"))


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
    order = np.argsort(-feature_errors)[: max(top_k, 0)]
    return {
        "schema_version": ALERT_SCHEMA_VERSION,
        "alert_id": alert_id(key, event_id),
        "event_id": event_id,
        "key": key,
        "event_timestamp": datetime.fromtimestamp(event_timestamp, tz=timezone.utc).isoformat(),
        "detected_at": datetime.fromtimestamp(time.time(), tz=timezone.utc).isoformat(),
        "score": float(score),
        "threshold": float(threshold),
        "severity": float(score / threshold) if threshold > 0 else None,
        "model_version": model_version,
        "model_kind": model_kind,
        "window_size": window_size,
        "top_features": [
            {"feature": feature_names[i], "error": float(feature_errors[i])} for i in order
        ],
    }


def encode_alert(alert: dict[str, Any]) -> bytes:
    return orjson.dumps(alert)
