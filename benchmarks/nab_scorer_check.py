"""Checks trainer/nab.py against NAB's own scorer: re-scores the stored results of published
detectors in a NAB checkout (``results/<detector>/<category>/<detector>_<series>.csv``) and
compares with NAB's ``results/final_results.json`` for the same files.

    .venv/bin/python benchmarks/nab_scorer_check.py --nab ../shared/nab --out benchmarks/results/nab-scorer-check.md
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.nab import Series, load_profiles, nab_scores, read_windows, window_rows  # noqa: E402


def read_detector_results(nab: Path, detector: str) -> list[Series]:
    """A detector's stored NAB result CSVs, one :class:`Series` per labelled data file."""
    windows = read_windows(nab / "labels" / "combined_windows.json")
    out = []
    for relative in sorted(windows):
        category, name = relative.split("/")
        path = nab / "results" / detector / category / f"{detector}_{name}"
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        times = [r["timestamp"] for r in rows]
        scores = np.array([float(r["anomaly_score"]) for r in rows])
        out.append(Series(relative, scores, window_rows(times, windows[relative], relative)))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nab", required=True, help="NAB checkout (data/, labels/, config/, results/)")
    parser.add_argument("--detectors", default="numenta,ARTime,windowedGaussian,null")
    parser.add_argument("--out", default="benchmarks/results/nab-scorer-check.md")
    args = parser.parse_args(argv)
    nab = Path(args.nab)
    profiles = load_profiles(nab / "config" / "profiles.json")
    published = json.loads((nab / "results" / "final_results.json").read_text())
    lines = ["# trainer/nab.py against NAB's own scorer", "",
             f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  ",
             f"Machine: {platform.machine()} {platform.system()}, Python {platform.python_version()}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             "The stored anomaly scores of each detector, re-scored by `trainer/nab.py` (threshold optimised per "
             "profile over the files, normalised against the null detector), beside NAB's own result for the same "
             "files (`results/final_results.json`).", "",
             "| detector | profile | NAB | trainer/nab.py | difference | threshold |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    worst = 0.0
    payload = {}
    for detector in [d for d in args.detectors.split(",") if d]:
        series = read_detector_results(nab, detector)
        result = nab_scores(series, profiles)
        payload[detector] = {}
        for profile, r in result.items():
            ref = published.get(detector, {}).get(profile)
            diff = r.normalised - ref if ref is not None else float("nan")
            worst = max(worst, abs(diff)) if ref is not None else worst
            payload[detector][profile] = {"nab": ref, "ours": r.normalised, "threshold": r.threshold, "raw": r.raw}
            published_cell = "-" if ref is None else f"{ref:.4f}"
            diff_cell = "-" if ref is None else f"{diff:+.2e}"
            lines.append(f"| {detector} | {profile} | {published_cell} | {r.normalised:.4f} | {diff_cell} | "
                         f"{r.threshold:.6g} |")
            print(f"{detector:18s} {profile:20s} NAB {ref} ours {r.normalised:.6f}", flush=True)
    lines += ["", f"Largest absolute difference: {worst:.2e} (points of the normalised score)."]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps(payload, indent=2, sort_keys=True))
    print(f"largest difference {worst:.2e}; wrote {args.out}")
    return 0 if worst < 0.005 else 1


if __name__ == "__main__":
    sys.exit(main())
