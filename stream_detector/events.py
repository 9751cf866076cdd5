"""Decoding and validation of incoming events.

An event is one JSON object per Kafka message::

    {"key": "device-7", "event_id": "e-123", "timestamp": "2026-01-01T00:00:00Z",
     "fields": {"Pressure": 0.98, "Temperature": 71.2}}

Anything else is rejected with a reason code (never an exception), so the worker can count it and
route the original bytes to the dead-letter topic.
"""

from __future__ import annotations

import json
import math
import operator
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Sequence, Union

import msgspec
import orjson

from .profiles import FieldSpec

# Reason codes: stable strings, used as metric labels and dead-letter headers.
OVERSIZED = "oversized"
EMPTY = "empty"
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_KEY = "missing_key"
BAD_KEY = "bad_key"
MISSING_EVENT_ID = "missing_event_id"
BAD_EVENT_ID = "bad_event_id"
MISSING_TIMESTAMP = "missing_timestamp"
BAD_TIMESTAMP = "bad_timestamp"
FUTURE_TIMESTAMP = "future_timestamp"
MISSING_FIELDS = "missing_fields"
MISSING_FIELD = "missing_field"
NON_NUMERIC = "non_numeric"
NON_FINITE = "non_finite"
BAD_IDENTIFIER = "bad_identifier"

REASONS = (
    OVERSIZED, EMPTY, MALFORMED_JSON, NOT_AN_OBJECT, MISSING_KEY, BAD_KEY, MISSING_EVENT_ID, BAD_EVENT_ID,
    MISSING_TIMESTAMP, BAD_TIMESTAMP, FUTURE_TIMESTAMP, MISSING_FIELDS, MISSING_FIELD, NON_NUMERIC, NON_FINITE, BAD_IDENTIFIER,
)

MAX_ID_LENGTH = 256
_NUMBER_TYPES = {int, float}
# The integers orjson reads as integers; beyond them it gives floats, which are not identifiers.
_MIN_INT, _MAX_INT = -(2 ** 63), 2 ** 64 - 1
# Timestamps above this are read as milliseconds since the epoch (year 5138 in seconds).
_MILLIS_CUTOFF = 1e11
# What a datetime (and so an alert's ``event_timestamp``) can represent: 0001-01-01 to 9999-12-31 UTC.
_MIN_TIMESTAMP = -62_135_596_800.0
_MAX_TIMESTAMP = 253_402_300_799.0


@dataclass(slots=True)
class Event:
    key: str
    event_id: str
    timestamp: float  # seconds since the epoch, UTC
    values: tuple[Any, ...]  # in the order of the profile's fields


@dataclass(slots=True)
class Invalid:
    reason: str
    detail: str


class EventDecoder:
    """Decodes raw message bytes into :class:`Event` for one profile's field list."""

    def __init__(self, fields: Sequence[FieldSpec], key_field: str = "", max_bytes: int = 1_000_000,
                 max_future_s: float | None = None, clock: Callable[[], float] = time.time):
        self.fields = tuple(fields)
        self.key_field = key_field
        self.max_bytes = max_bytes
        self.max_future_s = max_future_s  # None: no check (offline replays of old or simulated data)
        self.clock = clock
        names = tuple(spec.name for spec in self.fields)
        self._numbers: Callable[[dict[str, Any]], tuple[Any, ...]] | None = None
        if names and all(spec.kind == "number" for spec in self.fields):
            get = operator.itemgetter(*names)
            self._numbers = get if len(names) > 1 else (lambda payload: (get(payload),))
        # Where a typed read finds the key: the top-level `key` (None), or an index into its fields.
        self._key_index: int | None = None
        if key_field:
            self._key_index = names.index(key_field) if key_field in names else len(names)
        self._typed = _typed_decoder(self.fields, key_field)

    def decode(self, raw: bytes | None) -> Event | Invalid:
        if raw is None or len(raw) == 0:
            return Invalid(EMPTY, "message has no value")
        if len(raw) > self.max_bytes:
            return Invalid(OVERSIZED, f"{len(raw)} bytes > limit {self.max_bytes}")
        try:
            typed = self._typed.decode(raw) if self._typed is not None else None
        except Exception:  # DecodeError; ValueError: invalid UTF-8; RecursionError: deep nesting
            typed = None  # whatever went wrong, the generic path below names the reason
        if typed is not None:
            event = self._accept(typed)
            if event is not None:
                return event
        # Not a well-formed event (or an edge case the typed read leaves to this path): the checks
        # below find the reason.
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            doc = _lenient_loads(raw)
            if isinstance(doc, Invalid):
                return doc if doc.reason == NON_FINITE else Invalid(MALFORMED_JSON, str(exc)[:200])
            # The lenient parse only names the reason a document is refused; it never accepts one
            # orjson refused (lone surrogates, UTF-16, ...), which would fail again when the alert
            # or the key is encoded.
            decoded = self.from_mapping(doc) if isinstance(doc, dict) else None
            if isinstance(decoded, Invalid):
                return decoded
            if decoded is not None:
                return Invalid(MALFORMED_JSON, str(exc)[:200])
        if not isinstance(doc, dict):
            return Invalid(NOT_AN_OBJECT, f"top level is {type(doc).__name__}")
        return self.from_mapping(doc)

    def _accept(self, typed: Any) -> Event | None:
        """The event from a typed read (every field present, of its type), or None when a value
        still fails a check: the generic path then names the reason."""
        values = msgspec.structs.astuple(typed.fields)
        key_index = self._key_index
        key = _fast_identifier(typed.key if key_index is None else values[key_index])
        event_id = _fast_identifier(typed.event_id)
        if key is None or event_id is None:
            return None
        timestamp = parse_timestamp(typed.timestamp)
        if timestamp is None or (self.max_future_s is not None and timestamp > self.clock() + self.max_future_s):
            return None
        if len(values) > len(self.fields):  # the key field, read after the profile's
            values = values[:-1]
        if self._numbers is not None:  # every field a number
            if not math.isfinite(sum(values)):  # a sum is finite only if every term is
                return None
            return Event(key, event_id, timestamp, values)
        checked: list[Any] = []
        for spec, value in zip(self.fields, values):
            if spec.kind == "number":
                if not math.isfinite(value):
                    return None
            else:
                value = _fast_identifier(value)
                if value is None:
                    return None
            checked.append(value)
        return Event(key, event_id, timestamp, tuple(checked))

    def from_mapping(self, doc: dict[str, Any]) -> Event | Invalid:
        """Validates an already-parsed event (the trainer's CSV rows come this way too)."""
        payload = doc.get("fields")
        if not isinstance(payload, dict):
            return Invalid(MISSING_FIELDS, "`fields` must be an object of named values")

        if self.key_field:
            key = _identifier(payload.get(self.key_field))
            if key is None:
                return Invalid(BAD_KEY, f"key field {self.key_field!r} missing or not an identifier")
        else:
            if "key" not in doc or doc["key"] is None:
                return Invalid(MISSING_KEY, "`key` is required")
            key = _identifier(doc["key"])
            if key is None:
                return Invalid(BAD_KEY, "`key` must be a non-empty string or integer")

        if "event_id" not in doc or doc["event_id"] is None:
            return Invalid(MISSING_EVENT_ID, "`event_id` is required")
        event_id = _identifier(doc["event_id"])
        if event_id is None:
            return Invalid(BAD_EVENT_ID, "`event_id` must be a non-empty string or integer")

        if "timestamp" not in doc or doc["timestamp"] is None:
            return Invalid(MISSING_TIMESTAMP, "`timestamp` is required")
        timestamp = parse_timestamp(doc["timestamp"])
        if timestamp is None:
            return Invalid(BAD_TIMESTAMP, f"unreadable timestamp {str(doc['timestamp'])[:64]!r}")
        if self.max_future_s is not None and timestamp > self.clock() + self.max_future_s:
            return Invalid(FUTURE_TIMESTAMP, f"timestamp {timestamp:.0f} is more than {self.max_future_s:.0f}s ahead")

        if self._numbers is not None:  # fast path: every field a number, as in the sensors profile
            try:
                raw = self._numbers(payload)
            except KeyError:
                raw = None
            if raw is not None and set(map(type, raw)) <= _NUMBER_TYPES:  # not bool, None or str
                try:
                    fast = tuple(map(float, raw))
                except OverflowError:
                    fast = None
                if fast is not None and math.isfinite(sum(fast)):  # a sum is finite only if every term is
                    return Event(key, event_id, timestamp, fast)
            # anything else: the checks below, which name the reason
        values: list[Any] = []
        for spec in self.fields:
            if spec.name not in payload or payload[spec.name] is None:
                return Invalid(MISSING_FIELD, f"field {spec.name!r} is missing")
            value = payload[spec.name]
            if spec.kind == "number":
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    return Invalid(NON_NUMERIC, f"field {spec.name!r} is not a number")
                try:
                    value = float(value)
                except OverflowError:  # an int beyond float range (CSV rows, the lenient JSON path)
                    return Invalid(NON_FINITE, f"field {spec.name!r} is not finite")
                if not math.isfinite(value):
                    return Invalid(NON_FINITE, f"field {spec.name!r} is not finite")
            else:
                value = _identifier(value)
                if value is None:
                    return Invalid(BAD_IDENTIFIER, f"field {spec.name!r} must be a string or integer")
            values.append(value)
        return Event(key, event_id, timestamp, tuple(values))


def _typed_decoder(fields: Sequence[FieldSpec], key_field: str) -> msgspec.json.Decoder | None:
    """A decoder that parses and type-checks a well-formed event in one C pass (msgspec): with the
    checks after it, 1.7 us per sensor event against 3.3 us for orjson plus the checks in Python.
    None when the key is a numeric field (its identifier would need the JSON integer, which a float
    read loses).

    Numbers are read as floats (integers included; booleans, strings and nulls refused), identifiers
    as strings or integers. Unknown keys are ignored, as on the generic path.
    """
    if any(spec.name == key_field and spec.kind == "number" for spec in fields):
        return None
    specs = [(f"f{i}", float if spec.kind == "number" else Union[str, int]) for i, spec in enumerate(fields)]
    rename = {f"f{i}": spec.name for i, spec in enumerate(fields)}
    if key_field and key_field not in rename.values():
        specs.append(("key_field", Union[str, int]))
        rename["key_field"] = key_field
    fields_type = msgspec.defstruct("Fields", specs, rename=rename)
    top: list[Any] = [("event_id", Union[str, int]), ("timestamp", Union[float, str]), ("fields", fields_type)]
    if not key_field:
        top.insert(0, ("key", Union[str, int]))
    return msgspec.json.Decoder(msgspec.defstruct("TypedEvent", top))


def _fast_identifier(value: Any) -> str | None:
    if type(value) is str:
        return value if 0 < len(value) <= MAX_ID_LENGTH else None
    if type(value) is int and _MIN_INT <= value <= _MAX_INT:
        return str(value)
    return None


class _NonFiniteLiteral(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _NonFiniteLiteral(name)


def _lenient_loads(raw: bytes) -> Any:
    """The error path only: tells NaN/Infinity literals and overflowing numbers (which strict JSON
    parsers refuse, but Python's ``json.dumps`` writes) apart from plain malformed JSON."""
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except _NonFiniteLiteral as exc:
        return Invalid(NON_FINITE, f"non-finite literal {exc}")
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return Invalid(MALFORMED_JSON, str(exc)[:200])


def _identifier(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH:
        return value
    return None


def parse_timestamp(value: Any) -> float | None:
    """Epoch seconds (or milliseconds, read by magnitude) or an ISO-8601 string, as UTC seconds."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            ts = float(value)
        except OverflowError:
            return None
        if not math.isfinite(ts) or ts < 0:
            return None
        ts = ts / 1000.0 if ts > _MILLIS_CUTOFF else ts
        return ts if ts <= _MAX_TIMESTAMP else None
    if isinstance(value, str) and len(value) <= 64:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        ts = parsed.timestamp()
        return ts if _MIN_TIMESTAMP <= ts <= _MAX_TIMESTAMP else None
    return None


def encode_event(key: str, event_id: str, timestamp: float | str, fields: dict[str, Any], **extra: Any) -> bytes:
    """The producer side of the contract, used by the demo producer and tests."""
    doc = {"key": key, "event_id": event_id, "timestamp": timestamp, "fields": fields}
    doc.update(extra)
    return orjson.dumps(doc)
