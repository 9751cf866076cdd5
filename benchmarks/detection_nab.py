#!/usr/bin/env python
"""NAB result files from the detector's defaults, for NAB's official scorer.

    .venv/bin/python benchmarks/detection_nab.py --nab ../shared/nab --out /tmp/nab-results

One model per series, trained by the trainer's defaults on the series' probationary period (the
first 15 %, at most 750 rows: NAB's rule), then every row replayed through the worker's detector.
Two detectors are written, under ``<out>/<name>/<category>/<name>_<series>.csv``:

- ``sdseverity``: ``anomaly_score`` = severity / (1 + severity) (severity = score / the key's
  threshold), a monotone map of what every alert carries, for NAB's threshold optimiser;
- ``sdalerts``: 1 on rows whose window the incident lifecycle published (in an alert's
  ``event_ids``), else 0: the alerts the worker publishes.

Copy them into a copy of NAB's ``results/`` and run its scorer (see ../shared/nab/README.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stream_detector.artifacts import load_artifact  # noqa: E402
from stream_detector.detector import Detector  # noqa: E402
from stream_detector.scoring import ModelRunner  # noqa: E402
from trainer.data import CsvSpec, load_csv  # noqa: E402
from trainer.cli import DEFAULTS_BY_PROFILE  # noqa: E402
from trainer.fit import TrainConfig, train_and_save  # noqa: E402


def probation(n: int) -> int:
    return min(int(0.15 * n), 750)


def run_series(path: Path, config: TrainConfig, work: Path) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    data = load_csv([str(path)], "sensors", CsvSpec(time_column="timestamp"))
    n = len(data.events)
    head = probation(n)
    model_path, _ = train_and_save(data.events[:head], data.profile, config, work / path.stem, progress=False)
    artifact = load_artifact(model_path)
    runner = ModelRunner(artifact, device="cpu")
    now = [data.events[0].timestamp]
    detector = Detector(artifact, runner.score, clock=lambda: now[0])
    severity = np.zeros(n)
    published = np.zeros(n)
    index = {e.event_id: i for i, e in enumerate(data.events)}
    for start in range(0, n, 256):
        chunk = data.events[start:start + 256]
        now[0] = chunk[-1].timestamp
        batch = detector.prepare_events(chunk)
        decisions = detector.finish(batch, detector.score(batch))
        messages = [d.alert for d in decisions if d.alert is not None] + detector.drain_closed()
        for d in decisions:
            severity[index[d.event.event_id]] = d.severity or 0.0
        for m in messages:
            for event_id in m["event_ids"]:
                published[index[event_id]] = 1.0
    stamps = [e.event_id for e in data.events]
    return severity, published, stamps, [str(e.values[0]) for e in data.events]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nab", default="../shared/nab")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    nab = Path(args.nab)
    labels = json.loads((nab / "labels" / "combined_labels.json").read_text())
    out = Path(args.out)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for relative in sorted(labels):
            path = nab / "data" / relative
            rows = [line.rstrip("\n").split(",") for line in path.read_text().splitlines()[1:]]
            config = TrainConfig(threads=args.threads, **DEFAULTS_BY_PROFILE["sensors"])  # `trainer train`'s defaults
            severity, published, _, _ = run_series(path, config, Path(tmp))
            marked = set(labels[relative])
            category, name = relative.split("/")
            for detector, values in (("sdseverity", severity / (1.0 + severity)), ("sdalerts", published)):
                target = out / detector / category / f"{detector}_{name}"
                target.parent.mkdir(parents=True, exist_ok=True)
                lines = ["timestamp,value,anomaly_score,label"]
                for (stamp, value), score in zip(rows, values):
                    lines.append(f"{stamp},{value},{score:.6f},{int(stamp in marked)}")
                target.write_text("\n".join(lines) + "\n")
            print(f"{relative}: {len(rows)} rows, probation {probation(len(rows))}, "
                  f"{int(published.sum())} published rows", flush=True)
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
