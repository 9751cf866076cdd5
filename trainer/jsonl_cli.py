"""`--jsonl` flags of `trainer train` and `trainer evaluate`: a dump of the input topic as data."""

from __future__ import annotations

import argparse

from stream_detector.profiles import Profile

from .data import LoadedData
from .jsonl import load_jsonl


def _jsonl_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jsonl", action="append", default=[],
                   help="JSON-lines dump of the input topic (one event per line, the worker's contract); "
                        "file, directory or glob, repeatable, .gz ok")
    p.add_argument("--label-field", default="label",
                   help="--jsonl: top-level 0/1 anomaly label of each event (missing: normal)")


def _jsonl_data(args: argparse.Namespace, profile: str | Profile) -> LoadedData:
    fields = [f for f in args.fields.split(",") if f] if getattr(args, "fields", None) else None
    data = load_jsonl(args.jsonl, profile, fields=fields, label_field=args.label_field)
    if data.rejected:
        counts = ", ".join(f"{reason} {n}" for reason, n in sorted(data.rejected.items()))
        print(f"--jsonl: {sum(data.rejected.values())} line(s) skipped ({counts}); "
              f"{len(data.events)} events read", flush=True)
    return data
