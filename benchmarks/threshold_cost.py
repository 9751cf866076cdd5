#!/usr/bin/env python
"""Cost of the threshold policies per judged window, by how many keys share a micro-batch.

    .venv/bin/python benchmarks/threshold_cost.py --out benchmarks/results/threshold_cost.md

A batch of 1,024 windows (8 features) over 2,000, 100 or 10 distinct keys is judged 60 times by the
default per-key tail calibration, by the same with the normal values tail, and by per-key adaptive
thresholds; the median of the last 50 is
reported per window. Both handle a key that occurs several times in a batch in rounds (one numpy
pass per occurrence), so hot keys cost more.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.quality import machine  # noqa: E402
from stream_detector.surprise import TailCalibration, TailConfig  # noqa: E402
from stream_detector.thresholds import AdaptiveThreshold  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/threshold_cost.md")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for n_keys in (2000, 100, 10):
        keys = [f"k{i % n_keys}" for i in range(1024)]
        for name, policy in (("tail calibration (default: empirical values tail)", TailCalibration(5.0, 8, TailConfig())),
                             ("tail calibration, normal values tail",
                              TailCalibration(5.0, 8, TailConfig(values_tail="normal"))),
                             ("adaptive thresholds", AdaptiveThreshold(5.0, 1.0))):
            times = []
            for _ in range(60):
                scores, values = np.abs(rng.normal(1, 0.1, 1024)), rng.normal(0, 1, (1024, 8))
                started = time.perf_counter()
                if isinstance(policy, TailCalibration):
                    policy.judge(keys, scores, values)
                else:
                    policy.assess(keys, scores)
                times.append(time.perf_counter() - started)
            rows.append((n_keys, name, float(np.median(times[10:])) * 1e6 / 1024))
            print(f"{n_keys:5d} keys, {name}: {rows[-1][2]:.2f} us per window", flush=True)
    m = machine()
    lines = ["# Threshold policies: cost per judged window", "",
             "Command: `.venv/bin/python benchmarks/threshold_cost.py`  ",
             f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}", "",
             "Batches of 1,024 windows, 8 features; median of 50 batches.", "",
             "| distinct keys in the batch | policy | us per window |", "| ---: | --- | ---: |"]
    lines += [f"| {k} | {name} | {us:.2f} |" for k, name, us in rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
