#!/usr/bin/env python
"""Cost of the threshold policies per judged window, by how many keys share a micro-batch.

    .venv/bin/python benchmarks/threshold_cost.py --out benchmarks/results/threshold_cost.md

A batch of 1,024 windows (8 features) over 2,000, 100 or 10 distinct keys is judged 60 times by the
default per-key tail calibration, by the same with the normal values tail, with the seasonal check
(while keys buffer their first windows, and once every key has learned its period: each key's values
are then a noisy sine of period 48, fed until its period is found; `season_max_features=8` so that
these 8-feature keys get the check), and by per-key adaptive
thresholds; the median of the last 50 is reported per window. The seasonal check's one-off period
search per key (when its buffer is full) is timed apart. Both handle a key that occurs several times in a batch in rounds (one numpy
pass per occurrence), so hot keys cost more.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.quality import machine  # noqa: E402
from stream_detector.surprise import TailCalibration, TailConfig  # noqa: E402
from stream_detector.thresholds import AdaptiveThreshold  # noqa: E402


def periodic(rng: np.random.Generator, seen: dict[str, int], keys: list[str]) -> np.ndarray:
    """Values of a batch whose keys each follow a noisy sine of period 48 (``seen``: windows each key
    had so far, updated)."""
    occurrence = np.zeros(len(keys), dtype=np.int64)
    for i, k in enumerate(keys):
        occurrence[i] = seen.get(k, 0)
        seen[k] = occurrence[i] + 1
    phase = occurrence % 48
    return np.sin(2 * np.pi * phase / 48)[:, None] * 3.0 + rng.normal(0, 0.3, (len(keys), 8))


def detection_ms(rng: np.random.Generator) -> float:
    """Milliseconds of one key's period search (8 features, the default longest period)."""
    config = TailConfig(seasonal=True, season_max_features=8)
    policy = TailCalibration(5.0, 8, config)
    n = 2 * config.season_max + 1
    seen: dict[str, int] = {}
    policy.judge(["k"] * (n - 1), np.ones(n - 1), periodic(rng, seen, ["k"] * (n - 1)))
    started = time.perf_counter()
    policy.judge(["k"], np.ones(1), periodic(rng, seen, ["k"]))
    return (time.perf_counter() - started) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/threshold_cost.md")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    load = os.getloadavg()
    rows = []
    found: dict[int, float] = {}
    for n_keys in (2000, 100, 10):
        keys = [f"k{i % n_keys}" for i in range(1024)]
        seasonal = TailConfig(seasonal=True, season_max_features=8)  # the check on these 8-feature keys
        learned = TailCalibration(5.0, 8, seasonal)
        seen: dict[str, int] = {}
        while min(seen.values(), default=0) < 2 * seasonal.season_max + 2:  # every key past its buffer
            learned.judge(keys, np.abs(rng.normal(1, 0.1, 1024)), periodic(rng, seen, keys))
        found[n_keys] = float((learned._season_period[:len(learned._rows)] == 48).mean())
        for name, policy, data in (
                ("tail calibration (default: empirical values tail)", TailCalibration(5.0, 8, TailConfig()), None),
                ("tail calibration, normal values tail", TailCalibration(5.0, 8, TailConfig(values_tail="normal")),
                 None),
                ("tail calibration + seasonal check, keys buffering", TailCalibration(5.0, 8, seasonal), None),
                ("tail calibration + seasonal check, periods learned", learned, "periodic"),
                ("adaptive thresholds", AdaptiveThreshold(5.0, 1.0), None)):
            times = []
            for _ in range(60):
                scores = np.abs(rng.normal(1, 0.1, 1024))
                if data == "periodic":
                    values = periodic(rng, seen, keys)
                else:
                    values = rng.normal(0, 1, (1024, 8))
                started = time.perf_counter()
                if isinstance(policy, TailCalibration):
                    policy.judge(keys, scores, values)
                else:
                    policy.assess(keys, scores)
                times.append(time.perf_counter() - started)
            rows.append((n_keys, name, float(np.median(times[10:])) * 1e6 / 1024))
            print(f"{n_keys:5d} keys, {name}: {rows[-1][2]:.2f} us per window", flush=True)
    search = detection_ms(rng)
    print(f"period search: {search:.1f} ms per key", flush=True)
    m = machine()
    lines = ["# Threshold policies: cost per judged window", "",
             "Command: `.venv/bin/python benchmarks/threshold_cost.py`  ",
             f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}; load average "
             f"{load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (other processes share the cores)", "",
             "Batches of 1,024 windows, 8 features; median of 50 batches.", "",
             "| distinct keys in the batch | policy | us per window |", "| ---: | --- | ---: |"]
    lines += [f"| {k} | {name} | {us:.2f} |" for k, name, us in rows]
    lines += ["", "Keys whose period (48) the seasonal check had found before timing: "
              + ", ".join(f"{share:.0%} of {k}" for k, share in found.items()) + ".",
              "", f"The seasonal check's period search, once per key when its buffer of "
              f"{2 * TailConfig().season_max + 1} windows is full (8 features): {search:.1f} ms."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
