"""Training and evaluation data from a dump of the input topic: one JSON event per line.

The format is the worker's event contract (``kcat -C -t events -e > events.jsonl`` writes it), and
every line goes through the worker's own :class:`EventDecoder`, so what the trainer accepts is what
the worker would score. Invalid lines are counted by the decoder's reason codes, never fatal. A
top-level ``label`` (0/1, as the demo producer writes) is the anomaly label; without one a line is
normal.
"""

from __future__ import annotations

import glob
import gzip
import os
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import orjson

from stream_detector.events import EventDecoder, Invalid
from stream_detector.profiles import Profile, SensorProfile, TransactionProfile

from .data import LoadedData

BLANK = "blank_line"  # not an event at all: skipped, but still counted


def expand_jsonl_paths(paths: Sequence[str]) -> list[str]:
    """Files, globs, or directories (their ``.jsonl``, ``.json`` and ``.gz`` files)."""
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            out.extend(sorted(str(q) for q in Path(p).iterdir() if q.suffix in (".jsonl", ".json", ".gz")))
        else:
            matched = sorted(glob.glob(p))
            if not matched:
                raise FileNotFoundError(f"no JSON-lines file matches {p!r}")
            out.extend(matched)
    return out


def _read_lines(path: str) -> list[bytes]:
    """Bytes, not text: a line that is not UTF-8 is the decoder's to reject, not the reader's."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        return fh.read().splitlines()


def _sensor_channels(lines: Sequence[bytes]) -> list[str]:
    """The numeric ``fields`` of the first line that has any, in the order they appear there."""
    for raw in lines:
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        fields = doc.get("fields") if isinstance(doc, dict) else None
        if isinstance(fields, dict):
            channels = [k for k, v in fields.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if channels:
                return channels
    raise ValueError("no line with numeric `fields` found; pass --fields")


def _label(raw: bytes, label_field: str) -> int:
    try:
        value: Any = orjson.loads(raw).get(label_field, 0)
    except (orjson.JSONDecodeError, AttributeError):
        return 0
    return 1 if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else int(value is True)


def load_jsonl(paths: Sequence[str], profile: str | Profile, fields: Sequence[str] | None = None,
               label_field: str = "label", key_field: str = "") -> LoadedData:
    """Reads JSON-lines dumps as events of a profile (a name, or an artifact's :class:`Profile`)."""
    files = expand_jsonl_paths(paths)
    lines: list[bytes] = []
    for path in files:
        lines.extend(_read_lines(path))
    if not lines:
        raise ValueError("no lines to read in " + ", ".join(paths))
    if profile == "sensors":
        profile = SensorProfile(list(fields) if fields else _sensor_channels(lines))
    elif profile == "transactions":
        profile = TransactionProfile()
    elif not isinstance(profile, (SensorProfile, TransactionProfile)):
        raise ValueError(f"unknown profile {profile!r}")
    decoder = EventDecoder(profile.fields, key_field=key_field)
    rejected: Counter = Counter()
    keyed = []
    for seq, raw in enumerate(lines):
        raw = raw.strip()
        if not raw:
            rejected[BLANK] += 1
            continue
        decoded = decoder.decode(raw)
        if isinstance(decoded, Invalid):
            rejected[decoded.reason] += 1
            continue
        keyed.append((decoded.timestamp, seq, decoded, _label(raw, label_field)))
    keyed.sort(key=lambda item: (item[0], item[1]))  # stable timestamp order across keys, as for CSV
    return LoadedData([k[2] for k in keyed], [k[3] for k in keyed], profile, rejected, files)
