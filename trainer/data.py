"""Labelled CSV sources -> events in timestamp order, validated by the worker's own decoder."""

from __future__ import annotations

import csv
import glob
import gzip
import io
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

from stream_detector.events import Event, EventDecoder, Invalid
from stream_detector.profiles import Profile, SensorProfile, TransactionProfile
from stream_detector.synthetic import LabelledEvent

TIME_COLUMN_GUESSES = ("timestamp", "datetime", "time", "TX_DATETIME", "date")
LABEL_COLUMN_GUESSES = ("label", "anomaly", "is_anomaly")  # never read as a channel unless asked for


@dataclass
class CsvSpec:
    """How to read a CSV: all names are flags of ``trainer train`` and ``trainer evaluate``."""

    sep: str = ","
    key_column: str | None = None  # None: one key per file (trainer.data.file_keys)
    time_column: str | None = None  # None: guessed from TIME_COLUMN_GUESSES
    label_column: str | None = None  # None: a column named as in LABEL_COLUMN_GUESSES, if any
    id_column: str | None = None  # None: the file's key + row number
    fields: Sequence[str] | None = None  # sensors: None = every numeric column left over
    exclude: Sequence[str] = ()
    amount_column: str = "amount"
    terminal_column: str = "terminal_id"
    head_rows_per_key: int | None = None  # keep only each key's first N rows (SKAB's training part)
    skip_rows_per_key: int | None = None  # drop each key's first N rows (SKAB's test part)
    extra_columns: Sequence[str] = ()  # kept per event in LoadedData.extras (analysis only, never features)


@dataclass
class LoadedData:
    events: list[Event]
    labels: list[int]
    profile: Profile
    rejected: Counter = field(default_factory=Counter)
    files: list[str] = field(default_factory=list)
    extras: dict[str, list[str]] = field(default_factory=dict)  # CsvSpec.extra_columns, per event

    def describe(self) -> dict:
        keys = {e.key for e in self.events}
        return {"files": self.files, "events": len(self.events), "keys": len(keys),
                "labelled_anomalies": int(sum(self.labels)), "rejected_rows": dict(self.rejected)}


def expand_paths(paths: Iterable[str]) -> list[str]:
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            out.extend(sorted(str(q) for q in Path(p).iterdir() if q.suffix in (".csv", ".gz")))
        else:
            matched = sorted(glob.glob(p))
            if not matched:
                raise FileNotFoundError(f"no CSV file matches {p!r}")
            out.extend(matched)
    return out


def _bare_name(path: str) -> str:
    """A file's name without its extensions (``1.csv.gz`` -> ``1``)."""
    return Path(path).name.split(".")[0]


def file_keys(files: Sequence[str]) -> dict[str, str]:
    """The key of each file's events when no key column is given: its bare name when no other file
    has the same one, else its path relative to the files' common folder, without extensions
    (``valve1/1.csv`` and ``valve2/1.csv`` -> ``valve1/1`` and ``valve2/1``), so two files never
    become one key."""
    absolute = [os.path.abspath(f) for f in files]
    if len(set(absolute)) != len(absolute):
        raise ValueError("the same CSV file is given more than once")
    names = {f: _bare_name(f) for f in files}
    counts = Counter(names.values())
    if all(counts[n] == 1 for n in names.values()):
        return names
    root = os.path.commonpath([os.path.dirname(a) for a in absolute])
    out = {f: (Path(os.path.relpath(a, root)).parent / _bare_name(f)).as_posix() for f, a in zip(files, absolute)}
    if len(set(out.values())) != len(out):  # a.csv and a.csv.gz side by side
        raise ValueError("two CSV files differ only by their extensions: " + ", ".join(sorted(files)))
    return out


def _open_text(path: str) -> io.TextIOBase:
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _number(text: str) -> float | str | None:
    if text is None or text.strip() == "":
        return None
    try:
        return float(text)
    except ValueError:
        return text


def load_csv(paths: Sequence[str], profile: str | Profile, spec: CsvSpec) -> LoadedData:
    """Reads CSV rows as events of a profile: a name (``sensors``: channels from ``spec.fields`` or
    every numeric column left over; ``transactions``: the default profile), or a :class:`Profile`
    itself (an artifact's, when replaying data through a trained model)."""
    files = expand_paths(paths)
    rows_by_file: list[tuple[str, list[str], list[list[str]]]] = []
    for path in files:
        with _open_text(path) as fh:
            reader = csv.reader(fh, delimiter=spec.sep)
            header = [h.strip() for h in next(reader)]
            rows_by_file.append((path, header, [r for r in reader if r]))
    if not rows_by_file:
        raise ValueError("no CSV rows to read")
    header = rows_by_file[0][1]
    time_column = spec.time_column or next((c for c in TIME_COLUMN_GUESSES if c in header), None)
    if time_column is None:
        raise ValueError(f"no time column found; pass --time-column (columns: {', '.join(header)})")

    label_column = spec.label_column or next(
        (c for c in LABEL_COLUMN_GUESSES if c in header and c not in (spec.fields or ())), None)
    given_label_column = spec.label_column
    spec = replace(spec, label_column=label_column)
    reserved = {time_column, spec.key_column, spec.label_column, spec.id_column, *spec.exclude}
    if isinstance(profile, SensorProfile):
        column_of = {c: c for c in profile.channels}
    elif isinstance(profile, TransactionProfile):
        column_of = {profile.amount_field: spec.amount_column, profile.terminal_field: spec.terminal_column}
    elif profile == "sensors":
        channels = list(spec.fields) if spec.fields else _numeric_columns(rows_by_file[0], reserved)
        profile = SensorProfile(channels)
        column_of = {c: c for c in channels}
    elif profile == "transactions":
        profile = TransactionProfile()
        column_of = {profile.amount_field: spec.amount_column, profile.terminal_field: spec.terminal_column}
    else:
        raise ValueError(f"unknown profile {profile!r}")
    identifier_fields = {f.name for f in profile.fields if f.kind == "id"}

    decoder = EventDecoder(profile.fields)
    rejected: Counter = Counter()
    keyed: list[tuple[float, int, Event, int]] = []
    seq = 0
    key_of_file = file_keys([path for path, _, _ in rows_by_file])
    for path, cols, rows in rows_by_file:
        index = {c: i for i, c in enumerate(cols)}
        label_guessed = spec.label_column is not None and spec.label_column != given_label_column
        missing = [c for c in [time_column, *column_of.values(), spec.key_column,
                               None if label_guessed else spec.label_column, spec.id_column,
                               *spec.extra_columns] if c and c not in index]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (columns: {', '.join(cols)})")
        file_key = key_of_file[path]
        per_key_rows: Counter = Counter()
        for row_no, row in enumerate(rows):
            key = row[index[spec.key_column]] if spec.key_column else file_key
            n = per_key_rows[key]
            per_key_rows[key] += 1
            if spec.head_rows_per_key is not None and n >= spec.head_rows_per_key:
                continue
            if spec.skip_rows_per_key is not None and n < spec.skip_rows_per_key:
                continue
            fields = {name: row[index[col]] if name in identifier_fields else _number(row[index[col]])
                      for name, col in column_of.items()}
            event_id = row[index[spec.id_column]] if spec.id_column else f"{file_key}-{row_no}"
            doc = {"key": key, "event_id": event_id, "timestamp": row[index[time_column]], "fields": fields}
            ts = _number(doc["timestamp"])
            if isinstance(ts, float):
                doc["timestamp"] = ts
            decoded = decoder.from_mapping(doc)
            if isinstance(decoded, Invalid):
                rejected[decoded.reason] += 1
                continue
            label = 0
            if spec.label_column and spec.label_column in index:
                raw_label = _number(row[index[spec.label_column]])
                label = int(bool(raw_label)) if isinstance(raw_label, float) else 0
            extra = tuple(row[index[c]] for c in spec.extra_columns)
            keyed.append((decoded.timestamp, seq, decoded, label, extra))
            seq += 1
    keyed.sort(key=lambda item: (item[0], item[1]))  # stable timestamp order across keys
    extras = {c: [k[4][j] for k in keyed] for j, c in enumerate(spec.extra_columns)}
    return LoadedData([k[2] for k in keyed], [k[3] for k in keyed], profile, rejected, files, extras)


def _numeric_columns(sample: tuple[str, list[str], list[list[str]]], reserved: set) -> list[str]:
    _, header, rows = sample
    probe = rows[: min(len(rows), 50)]
    numeric = []
    for i, col in enumerate(header):
        if col in reserved or not col:
            continue
        if probe and all(isinstance(_number(r[i]), float) for r in probe if i < len(r) and r[i].strip()):
            numeric.append(col)
    if not numeric:
        raise ValueError("no numeric columns found; pass --fields")
    return numeric


def from_synthetic(events: Sequence[LabelledEvent], profile: Profile) -> LoadedData:
    decoder = EventDecoder(profile.fields)
    out, labels, rejected = [], [], Counter()
    for e in events:
        decoded = decoder.from_mapping(e.to_message())
        if isinstance(decoded, Invalid):
            rejected[decoded.reason] += 1
            continue
        out.append(decoded)
        labels.append(e.label)
    return LoadedData(out, labels, profile, rejected, ["<synthetic>"])
