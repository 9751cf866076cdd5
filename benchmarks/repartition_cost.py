"""What ``key_partition_check=repartition`` costs a well keyed event: ``Detector.prepare`` (decode,
window, copy the ready window) of micro-batches of well keyed records on their keys' partitions,
with and without the routing check, interleaved rounds on one thread; and, for comparison, the
cost of the hash the check computes only for a key not seen yet (or seen on another partition).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/repartition_cost.py [--out benchmarks/results/repartition_cost.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tempfile
import time
import timeit
from pathlib import Path

import numpy as np
import torch

from stream_detector.artifacts import load_artifact, save_artifact
from stream_detector.detector import Detector, RawRecord
from stream_detector.events import encode_event
from stream_detector.models import build_model
from stream_detector.preprocessing import ScalerParams
from stream_detector.profiles import SensorProfile
from stream_detector.repartition import KeyRouter, home_partition
from stream_detector.scoring import Scores
from stream_detector.thresholds import GlobalThreshold, fit_quantile_threshold

CHANNELS = ("Accelerometer1RMS", "Accelerometer2RMS", "Current", "Pressure", "Temperature", "Thermocouple",
            "Voltage", "VolumeFlowRateRMS")
WINDOW, KEYS, BATCH, PARTITIONS = 32, 1000, 1024, 4


def _artifact(root: Path):
    torch.manual_seed(0)
    model = build_model("dense_ae", {"n_features": len(CHANNELS), "window": WINDOW, "hidden": 8, "latent": 4})
    scaler = ScalerParams.fit(np.random.default_rng(0).normal(0.0, 1.0, (100, len(CHANNELS))))
    save_artifact(root, model, SensorProfile(CHANNELS), scaler, fit_quantile_threshold(np.random.default_rng(0).gamma(2.0, 1.0, 100), 0.99), version="20260101T000000Z-abcdef")
    return load_artifact(root)


def _scorer(windows: np.ndarray) -> Scores:
    return Scores(np.zeros(len(windows), np.float32), np.zeros((len(windows), len(CHANNELS)), np.float32))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        artifact = _artifact(Path(tmp) / "model")
    keys = [f"pump-{i:04d}" for i in range(KEYS)]
    home = {k: home_partition(k.encode(), PARTITIONS) for k in keys}
    t0 = 1_767_225_600.0
    offsets = [0] * PARTITIONS

    def batch(b: int) -> list[RawRecord]:
        out = []
        for i in range(BATCH):
            key = keys[(b * BATCH + i) % KEYS]
            p = home[key]
            offsets[p] += 1
            value = encode_event(key, f"{key}-{b}-{i}", t0 + b, {c: 0.5 for c in CHANNELS})
            out.append(RawRecord(value, key.encode(), t0 + b, p, offsets[p]))
        return out

    batches = [batch(b) for b in range(args.batches)]
    warm = [batch(args.batches + b) for b in range(WINDOW)]  # every key's window full before timing
    detectors = {}
    for name, router in (("off", None), ("repartition", KeyRouter("r", PARTITIONS))):
        detector = Detector(artifact, _scorer, threshold=GlobalThreshold(1.0), clock=lambda: t0, max_batch=BATCH,
                            router=router)
        for records in warm:
            detector.prepare(records)
        detectors[name] = detector
    per_event: dict[str, list[float]] = {name: [] for name in detectors}
    for _ in range(args.rounds):
        for name, detector in detectors.items():  # interleaved: both see the same machine state
            started = time.perf_counter()
            for records in batches:
                prepared = detector.prepare(records)
                assert not prepared.forward
            per_event[name].append((time.perf_counter() - started) / (len(batches) * BATCH) * 1e6)
    hash_us = {kind: min(timeit.repeat(lambda kind=kind: home_partition(b"pump-0042", PARTITIONS, kind),
                                       number=20_000, repeat=5)) / 20_000 * 1e6 for kind in ("consistent", "murmur2")}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# Cost of key_partition_check=repartition for well keyed events",
        "",
        f"Command: `PYTHONPATH=$PWD .venv/bin/python benchmarks/repartition_cost.py --rounds {args.rounds} "
        f"--batches {args.batches}`; commit {commit}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, shared with other work.",
        "",
        f"`Detector.prepare` of {args.batches} micro-batches of {BATCH} well keyed sensor records ({KEYS} keys, "
        f"window {WINDOW}, every window full, each record on its key's partition of {PARTITIONS}); "
        f"{args.rounds} interleaved rounds, microseconds per event:",
        "",
        "| key_partition_check | best | median |",
        "| --- | --- | --- |",
    ]
    for name, values in per_event.items():
        lines.append(f"| {name} | {min(values):.2f} | {float(np.median(values)):.2f} |")
    off, rep = min(per_event["off"]), min(per_event["repartition"])
    lines += ["", f"Difference (best): {rep - off:+.3f} us per event ({(rep / off - 1) * 100:+.1f} %).", "",
              "The home partition's hash, computed only for a key not seen yet or seen on another partition "
              "(not per event): " + ", ".join(f"{k} {v:.2f} us" for k, v in hash_us.items()) + "."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
