"""Operators' verdicts on incidents: the feedback topic.

One JSON object per message (schema in ``schemas/feedback.schema.json``), keyed by the incident
id on a compacted topic, so the topic keeps the latest verdict of every incident::

    {"incident_id": "...", "key": "...", "verdict": "false_positive", "at": "2025-01-01T00:00:00+00:00",
     "by": "alice", "note": "planned maintenance"}

Verdicts: ``true_positive`` (a real anomaly), ``false_positive`` (a false alarm: its windows are
normal training data for the next model), ``expected_change`` (a real change the key should now be
judged by: the worker closes the incident with reason ``acknowledged`` and restarts the key's
threshold warm-up). ``stream-detector ack`` publishes one; the worker counts them
(``stream_detector_feedback_total{verdict}``); ``trainer train --feedback-jsonl`` reads them.
A message that is not a valid verdict is refused with a reason (:class:`InvalidFeedback`): the
worker dead-letters it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson

TRUE_POSITIVE, FALSE_POSITIVE, EXPECTED_CHANGE = "true_positive", "false_positive", "expected_change"
VERDICTS = (TRUE_POSITIVE, FALSE_POSITIVE, EXPECTED_CHANGE)
INVALID_FEEDBACK = "invalid_feedback"  # the dead-letter reason
MAX_ID_CHARS = 256
MAX_KEY_CHARS = 1024
MAX_BY_CHARS = 256
MAX_NOTE_CHARS = 4096
_REQUIRED = ("incident_id", "key", "verdict", "at")
_FIELDS = frozenset(_REQUIRED + ("by", "note"))


class InvalidFeedback(ValueError):
    """Not a valid feedback message; ``str()`` says why."""


@dataclass(frozen=True)
class Feedback:
    incident_id: str
    key: str
    verdict: str
    at: str  # ISO 8601 with a UTC offset
    by: str | None = None
    note: str | None = None

    def __post_init__(self) -> None:
        _check_text("incident_id", self.incident_id, MAX_ID_CHARS, empty=False)
        _check_text("key", self.key, MAX_KEY_CHARS, empty=False)
        if self.verdict not in VERDICTS:
            raise InvalidFeedback(f"verdict must be one of {', '.join(VERDICTS)}, not {self.verdict!r}")
        _check_text("at", self.at, 64, empty=False)
        try:
            moment = datetime.fromisoformat(self.at)
        except ValueError:
            raise InvalidFeedback(f"at must be an ISO 8601 date-time, not {self.at!r}") from None
        if moment.tzinfo is None:
            raise InvalidFeedback(f"at must carry a UTC offset (e.g. +00:00), not {self.at!r}")
        if self.by is not None:
            _check_text("by", self.by, MAX_BY_CHARS)
        if self.note is not None:
            _check_text("note", self.note, MAX_NOTE_CHARS)

    @classmethod
    def new(cls, incident_id: str, key: str, verdict: str, by: str | None = None, note: str | None = None,
            at: float | None = None) -> "Feedback":
        """A verdict given now (or at ``at``, seconds since the epoch)."""
        moment = datetime.fromtimestamp(time.time() if at is None else at, tz=timezone.utc)
        return cls(incident_id, key, verdict, moment.isoformat(), by or None, note or None)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"incident_id": self.incident_id, "key": self.key, "verdict": self.verdict,
                               "at": self.at}
        if self.by is not None:
            out["by"] = self.by
        if self.note is not None:
            out["note"] = self.note
        return out

    def encode(self) -> tuple[bytes, bytes]:
        """(record key, record value) of its message on the feedback topic."""
        return self.incident_id.encode(), orjson.dumps(self.to_dict())


def _check_text(name: str, value: Any, limit: int, empty: bool = True) -> None:
    if not isinstance(value, str):
        raise InvalidFeedback(f"{name} must be a string, not {type(value).__name__}")
    if not empty and not value:
        raise InvalidFeedback(f"{name} must not be empty")
    if len(value) > limit:
        raise InvalidFeedback(f"{name} is longer than {limit} characters")


def parse_feedback(value: bytes | None, record_key: bytes | None = None) -> Feedback:
    """The verdict a feedback message holds; raises :class:`InvalidFeedback` saying what is wrong.

    The record key, when there is one, must be the incident id (compaction keeps one verdict per
    incident only if it is)."""
    if value is None:
        raise InvalidFeedback("empty message (a tombstone is not a verdict)")
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise InvalidFeedback(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidFeedback(f"not a JSON object but {type(data).__name__}")
    missing = [name for name in _REQUIRED if name not in data]
    if missing:
        raise InvalidFeedback(f"missing {', '.join(missing)}")
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise InvalidFeedback(f"unknown field(s) {', '.join(unknown)}")
    feedback = Feedback(data["incident_id"], data["key"], data["verdict"], data["at"], data.get("by"),
                        data.get("note"))
    if record_key is not None and record_key != feedback.incident_id.encode():
        raise InvalidFeedback("the record key must be the incident id")
    return feedback


def read_feedback_jsonl(path: str) -> dict[str, Feedback]:
    """The latest verdict of each incident in a JSON-lines dump of the feedback topic (one message
    value per line, as ``kcat -C -e -f '%s\\n'`` writes them); raises ValueError naming a bad line."""
    verdicts: dict[str, Feedback] = {}
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                feedback = parse_feedback(line.strip())
            except InvalidFeedback as exc:
                raise ValueError(f"{path}:{number}: {exc}") from None
            verdicts[feedback.incident_id] = feedback
    return verdicts
