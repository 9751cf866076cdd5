#!/usr/bin/env python
"""Choosing the tail calibration's settings on NAB by leaving categories out.

    .venv/bin/python benchmarks/nab_tail_cv.py --nab ../shared/nab --out benchmarks/results/nab_tail_cv.md

Each series is trained once as ``benchmarks/nab.py`` does (the trainer's defaults on the
probationary period), then replayed through the worker's ``Detector`` under every candidate of a
grid of tail settings (``--grid``: alert surprise, horizon, warm-up, values check). The figure per
candidate is what a user receives: NAB's standard score of the *incident openings* (one detection
per incident, as published, no threshold optimised). Each category is then scored under the
candidate chosen on the other categories only, so the reported total never saw the series it
scores; the per-fold choice and the spread across folds are in the report.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.nab import git_commit, load_series, read_nab_files, train_on_probation  # noqa: E402
from benchmarks.quality import machine  # noqa: E402
from stream_detector.artifacts import load_artifact  # noqa: E402
from stream_detector.surprise import TailCalibration, TailConfig  # noqa: E402
from trainer.evaluate import replay  # noqa: E402
from trainer.nab import PROFILES, Series, load_profiles, nab_scores, normalise, null_score  # noqa: E402


def parse_grid(text: str) -> list[TailConfig]:
    """``surprise=6,10,20;horizon=2000;warmup=100;values=1`` -> every combination."""
    axes: dict[str, list[Any]] = {"alert_surprise": [10.0], "horizon": [2000], "warmup": [100], "values": [True],
                                  "learn_clip": [3.0], "over_weight": [0.1], "calm_share": [0.5],
                                  "sustain": [8]}
    names = {"surprise": "alert_surprise", "horizon": "horizon", "warmup": "warmup", "values": "values",
             "clip": "learn_clip", "over": "over_weight", "calm": "calm_share",
             "sustain": "sustain"}
    for part in filter(None, text.split(";")):
        name, _, values = part.partition("=")
        field = names[name.strip()]
        cast = {"alert_surprise": float, "horizon": int, "warmup": int, "learn_clip": float, "over_weight": float,
                "calm_share": float, "sustain": int,
                "values": lambda v: v.strip() in ("1", "true")}[field]
        axes[field] = [cast(v) for v in values.split(",")]
    return [TailConfig(**dict(zip(axes, combo))) for combo in itertools.product(*axes.values())]


def label(c: TailConfig) -> str:
    return (f"surprise {c.alert_surprise:g}, horizon {c.horizon}, warm-up {c.warmup}, values {'on' if c.values else 'off'}, "
            f"clip {c.learn_clip:g}, over-weight {c.over_weight:g}, calm {c.calm_share:g}, "
            f"sustain {c.sustain}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nab", required=True)
    parser.add_argument("--out", default="benchmarks/results/nab_tail_cv.md")
    parser.add_argument("--grid", default="surprise=6,8,10,15,20,30")
    parser.add_argument("--series", default="")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    nab = Path(args.nab)
    profiles_path = nab / "config" / "profiles.json"
    profiles = load_profiles(profiles_path) if profiles_path.exists() else dict(PROFILES)
    cost = profiles["standard"]
    files = read_nab_files(nab, [s for s in args.series.split(",") if s])
    grid = parse_grid(args.grid)
    openings: dict[int, list[Series]] = {i: [] for i in range(len(grid))}
    with tempfile.TemporaryDirectory(prefix="nab-tail-cv-") as tmp:
        for f in files:
            artifact = load_artifact(train_on_probation(f, Path(tmp), 1, args.seed))
            data = load_series(f, artifact.profile)
            labels = Series(f.relative, np.zeros(len(f.timestamps)), f.windows).labels().tolist()
            for i, config in enumerate(grid):
                policy = TailCalibration(artifact.threshold, artifact.profile.n_features, config)
                result = replay(artifact, data.events, labels, device="cpu", threshold=policy)
                openings[i].append(Series(f.relative, result.opened.astype(np.float64), f.windows))
            print(f"{f.relative}: {len(grid)} candidates replayed", flush=True)
    cats = sorted({f.category for f in files})

    def score(series: list[Series]) -> float:
        r = nab_scores(series, {"standard": cost}, threshold=1.0)["standard"]
        return r.normalised

    def raw(series: list[Series]) -> float:
        return nab_scores(series, {"standard": cost}, threshold=1.0)["standard"].raw

    totals = {i: score(s) for i, s in openings.items()}
    per_cat = {i: {c: [s for s in ser if s.name.split("/")[0] == c] for c in cats} for i, ser in openings.items()}
    folds = []
    cv_raw = 0.0
    for c in cats:
        rest = {i: raw([s for s in ser if s.name.split("/")[0] != c]) for i, ser in openings.items()}
        best = max(rest, key=lambda i: (rest[i], -i))
        held = per_cat[best][c]
        windows = sum(len(s.windows) for s in held)
        held_raw = raw(held)
        folds.append({"category": c, "chosen": label(grid[best]), "windows": windows,
                      "score": normalise(held_raw, null_score(held, cost), windows * cost.tp_weight) if windows else None,
                      "raw": held_raw})
        cv_raw += held_raw
    all_series = openings[0]
    cv_total = normalise(cv_raw, null_score(all_series, cost), sum(len(s.windows) for s in all_series) * cost.tp_weight)
    seconds = time.perf_counter() - started
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/nab_tail_cv.py",
                                                 *(argv if argv is not None else sys.argv[1:])])
    lines = ["# NAB: the tail calibration's settings chosen by leaving categories out", "",
             f"- Command: `{command}`", f"- Machine: {machine()}", f"- Commit: `{git_commit()}`; {seconds:.0f} s",
             f"- Data: {len(files)} series in {len(cats)} categories; the figure is NAB's standard score of the "
             "incident openings (one detection per incident, as published; no threshold optimised).", "",
             "## Every candidate on all series (for reading only: choosing here would be tuning on the test)", "",
             "| candidate | total | " + " | ".join(cats) + " |", "| --- | ---: | " + " | ".join("---:" for _ in cats) + " |"]
    for i, config in enumerate(grid):
        cells = []
        for c in cats:
            held = per_cat[i][c]
            w = sum(len(s.windows) for s in held)
            cells.append(f"{normalise(raw(held), null_score(held, cost), w * cost.tp_weight):.2f}" if w
                         else f"raw {raw(held):.2f}")
        lines.append(f"| {label(config)} | {totals[i]:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "## Leave one category out", "",
              "| held-out category | candidate chosen on the others | its score there | raw |", "| --- | --- | ---: | ---: |"]
    for fold in folds:
        s = "no window" if fold["score"] is None else f"{fold['score']:.2f}"
        lines.append(f"| {fold['category']} | {fold['chosen']} | {s} | {fold['raw']:.2f} |")
    scored = [f["score"] for f in folds if f["score"] is not None]
    lines += ["", f"Cross-validated total: **{cv_total:.2f}** (folds: min {min(scored):.2f}, "
              f"median {float(np.median(scored)):.2f}, max {max(scored):.2f}).", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"command": command, "totals": {label(grid[i]): v for i, v in totals.items()},
                                                    "folds": folds, "cv_total": cv_total}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
