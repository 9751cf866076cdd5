#!/usr/bin/env python
"""Choosing the tail calibration's settings on NAB by leaving categories out.

    .venv/bin/python benchmarks/nab_tail_cv.py --nab ../shared/nab --out benchmarks/results/nab_tail_cv.md

Each series is trained once as ``benchmarks/nab.py`` does (the trainer's defaults on the
probationary period), then replayed through the worker's ``Detector`` under every candidate of a
grid of tail settings (``--grid``: alert surprise, horizon, warm-up, values check and its tail). The figure per
candidate is what a user receives: NAB's standard score of the *incident openings* (one detection
per incident, as published, no threshold optimised). Each category is then scored under the
candidate chosen on the other categories only, so the reported total never saw the series it
scores; the per-fold choice and the spread across folds are in the report.

Trained artifacts and the model's scores are cached under ``.cache/nab-tail-cv/`` by a content hash
of the series, its probationary rows, the seed and the training and model code, so a second run (a
new grid, a changed policy) only replays the policies (``--no-cache`` trains afresh).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.nab import NabFile, git_commit, load_series, read_nab_files, train_on_probation  # noqa: E402
from benchmarks.quality import machine  # noqa: E402
from stream_detector.artifacts import ModelArtifact, load_artifact  # noqa: E402
from stream_detector.scoring import ModelRunner, Scores  # noqa: E402
from stream_detector.surprise import TailCalibration, TailConfig  # noqa: E402
from trainer.evaluate import replay  # noqa: E402
from trainer.nab import PROFILES, Series, load_profiles, nab_scores, normalise, null_score, score_series  # noqa: E402


def parse_grid(text: str) -> list[TailConfig]:
    """``surprise=6,10,20;horizon=2000;warmup=100;values=1;vtail=normal,empirical;stail=normal,empirical;width=3;after=1`` -> every
    combination; products joined by ``|`` are united (each distinct candidate once, in order)."""
    out: list[TailConfig] = []
    for product in text.split("|"):
        out += [c for c in _parse_product(product) if c not in out]
    return out


def _parse_product(text: str) -> list[TailConfig]:
    axes: dict[str, list[Any]] = {"alert_surprise": [10.0], "horizon": [2000], "warmup": [100], "values": [True],
                                  "learn_clip": [3.0], "over_weight": [0.1], "calm_share": [0.5],
                                  "sustain": [8], "values_tail": ["normal"], "spike_width": [3],
                                  "spike_after": [1.0], "score_tail": ["normal"], "seasonal": [False],
                                  "season_max": [300], "season_min_acf": [0.8]}
    names = {"surprise": "alert_surprise", "horizon": "horizon", "warmup": "warmup", "values": "values",
             "clip": "learn_clip", "over": "over_weight", "calm": "calm_share",
             "sustain": "sustain", "vtail": "values_tail", "width": "spike_width", "after": "spike_after",
             "stail": "score_tail", "season": "seasonal", "smax": "season_max", "sacf": "season_min_acf"}
    for part in filter(None, text.split(";")):
        name, _, values = part.partition("=")
        field = names[name.strip()]
        cast = {"alert_surprise": float, "horizon": int, "warmup": int, "learn_clip": float, "over_weight": float,
                "calm_share": float, "sustain": int, "values_tail": str.strip, "score_tail": str.strip, "spike_width": int, "spike_after": float,
                "season_max": int, "season_min_acf": float,
                "values": lambda v: v.strip() in ("1", "true"), "seasonal": lambda v: v.strip() in ("1", "true")}[field]
        axes[field] = [cast(v) for v in values.split(",")]
    return [TailConfig(**dict(zip(axes, combo))) for combo in itertools.product(*axes.values())]


CACHE = ROOT / ".cache" / "nab-tail-cv"
# What a trained artifact and its scores depend on besides the series: everything but the policies
# being compared here (their code may change between runs without invalidating the cache).
_POLICY_CODE = {"surprise.py", "keyrows.py", "thresholds.py", "incidents.py", "alerts.py"}


def code_hash() -> str:
    """Hash of the training and model code (trainer/ and stream_detector/ without the policies)."""
    h = hashlib.sha256()
    for path in sorted([*(ROOT / "trainer").rglob("*.py"), *(ROOT / "stream_detector").rglob("*.py")]):
        if path.name not in _POLICY_CODE:
            h.update(str(path.relative_to(ROOT)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def trained(f: NabFile, seed: int, code: str, use_cache: bool, tmp: Path) -> tuple[Path, Path | None]:
    """The series' artifact directory (trained once per content hash) and where its scores are cached."""
    if not use_cache:
        return train_on_probation(f, tmp, 1, seed), None
    h = hashlib.sha256(f.path.read_bytes() + f"|{f.probation_rows}|{seed}|{code}".encode()).hexdigest()[:20]
    home = CACHE / h
    marker = home / "artifact.txt"
    if not marker.exists():
        work = Path(tempfile.mkdtemp(prefix=h + "-", dir=CACHE))
        artifact = train_on_probation(f, work, 1, seed)
        (work / "artifact.txt").write_text(str(artifact.relative_to(work)))
        try:
            os.replace(work, home)
        except OSError:  # trained concurrently by another run: keep the first
            shutil.rmtree(work, ignore_errors=True)
    return home / marker.read_text(), home / "scores.npz"


class RecordedScores:
    """The model's scores of one series' replay, computed once and replayed for every candidate.

    The Detector forms the same windows in the same batches whatever the threshold policy, so the
    i-th model call of every candidate gets the i-th recorded answer; a checksum of the windows
    guards that assumption."""

    def __init__(self, artifact: ModelArtifact, path: Path | None, batch: int = 1024):
        self.runner = ModelRunner(artifact, device="cpu", max_batch=batch)
        self.path = path
        self.calls: list[tuple[float, Scores]] = []
        if path is not None and path.exists():
            with np.load(path) as z:
                n = int(z["calls"])
                self.calls = [(float(z[f"sum{i}"]), Scores(z[f"s{i}"], z[f"f{i}"])) for i in range(n)]
        self.recorded = bool(self.calls)
        self.position = 0

    def start(self) -> "RecordedScores":
        self.position = 0
        return self

    def __call__(self, windows: np.ndarray) -> Scores:
        check = float(np.asarray(windows, dtype=np.float64).sum())
        i = self.position
        self.position += 1
        if self.recorded:
            total, scores = self.calls[i]
            if len(scores.scores) != len(windows) or not np.isclose(total, check, rtol=1e-9, atol=1e-6, equal_nan=True):
                raise RuntimeError("replayed windows differ from the recorded ones: remove the cache")
            return scores
        scores = self.runner.score(windows)
        self.calls.append((check, Scores(scores.scores.copy(), scores.feature_errors.copy())))
        return scores

    def finish(self) -> None:
        """After the first replay: later replays read the recorded scores (saved when cached)."""
        if not self.recorded:
            self.recorded = True
            if self.path is not None:
                arrays: dict[str, np.ndarray] = {"calls": np.array(len(self.calls))}
                for i, (total, sc) in enumerate(self.calls):
                    arrays.update({f"sum{i}": np.array(total), f"s{i}": sc.scores, f"f{i}": sc.feature_errors})
                tmp = self.path.with_suffix(f".{os.getpid()}.npz")
                np.savez(tmp, **arrays)
                os.replace(tmp, self.path)


def label(c: TailConfig) -> str:
    return (f"surprise {c.alert_surprise:g}, horizon {c.horizon}, warm-up {c.warmup}, values {'on' if c.values else 'off'}, "
            f"clip {c.learn_clip:g}, over-weight {c.over_weight:g}, calm {c.calm_share:g}, "
            f"sustain {c.sustain}"
            + (f", values tail {c.values_tail}" + (f" (spike width {c.spike_width}, after {c.spike_after:g})" if c.values_tail == "empirical" else "")
               if c.values else "")
            + (f", score tail {c.score_tail}" + (f" (spike width {c.spike_width}, after {c.spike_after:g})"
                                                 if not (c.values and c.values_tail == "empirical") else "")
               if c.score_tail != "normal" else "")
            + (f", seasonal (period up to {c.season_max}, acf {c.season_min_acf:g})" if c.seasonal and c.values else ""))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nab", required=True)
    parser.add_argument("--out", default="benchmarks/results/nab_tail_cv.md")
    parser.add_argument("--grid", default="surprise=6,8,10,15,20,30")
    parser.add_argument("--before", default="", help="a grid of candidates also in --grid (say, the options "
                        "before a change): its leave-one-category-out total is reported from the same replays")
    parser.add_argument("--series", default="")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true", help="train every series afresh, cache nothing")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    nab = Path(args.nab)
    profiles_path = nab / "config" / "profiles.json"
    profiles = load_profiles(profiles_path) if profiles_path.exists() else dict(PROFILES)
    cost = profiles["standard"]
    files = read_nab_files(nab, [s for s in args.series.split(",") if s])
    grid = parse_grid(args.grid)
    before = parse_grid(args.before) if args.before else []
    if any(c not in grid for c in before):
        parser.error("every --before candidate must be in --grid")
    openings: dict[int, list[Series]] = {i: [] for i in range(len(grid))}
    code = code_hash()
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nab-tail-cv-") as tmp:
        for f in files:
            artifact_dir, scores_path = trained(f, args.seed, code, not args.no_cache, Path(tmp))
            artifact = load_artifact(artifact_dir)
            data = load_series(f, artifact.profile)
            labels = Series(f.relative, np.zeros(len(f.timestamps)), f.windows).labels().tolist()
            scorer = RecordedScores(artifact, scores_path)
            for i, config in enumerate(grid):
                policy = TailCalibration(artifact.threshold, artifact.profile.n_features, config)
                result = replay(artifact, data.events, labels, device="cpu", threshold=policy, scorer=scorer.start())
                scorer.finish()
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
    all_series = openings[0]

    def leave_one_out(candidates: list[int]) -> tuple[list[dict[str, Any]], float]:
        """Each category scored under the candidate (of these) with the best raw score on the others."""
        folds = []
        cv_raw = 0.0
        for c in cats:
            rest = {i: raw([s for s in openings[i] if s.name.split("/")[0] != c]) for i in candidates}
            best = max(rest, key=lambda i: (rest[i], -i))
            held = per_cat[best][c]
            windows = sum(len(s.windows) for s in held)
            held_raw = raw(held)
            folds.append({"category": c, "chosen": label(grid[best]), "windows": windows,
                          "score": normalise(held_raw, null_score(held, cost), windows * cost.tp_weight) if windows
                          else None, "raw": held_raw})
            cv_raw += held_raw
        return folds, normalise(cv_raw, null_score(all_series, cost),
                                sum(len(s.windows) for s in all_series) * cost.tp_weight)

    folds, cv_total = leave_one_out(list(range(len(grid))))
    before_result = leave_one_out([grid.index(c) for c in before]) if before else None

    # Leave one series out: raw scores at a fixed threshold add up over series, so each series is
    # scored under the candidate with the best raw total on the other 23.
    series_raw = {i: {s.name: score_series(s, cost, 1.0).score for s in ser} for i, ser in openings.items()}

    def leave_series_out(candidates: list[int]) -> dict[str, Any]:
        total_raw, per = 0.0, []
        chosen: dict[str, int] = {}
        for s in all_series:
            rest = {i: sum(v for n, v in series_raw[i].items() if n != s.name) for i in candidates}
            best = max(rest, key=lambda i: (rest[i], -i))
            chosen[label(grid[best])] = chosen.get(label(grid[best]), 0) + 1
            held = series_raw[best][s.name]
            total_raw += held
            if s.windows:
                per.append(normalise(held, -cost.fn_weight * len(s.windows), cost.tp_weight * len(s.windows)))
        total = normalise(total_raw, null_score(all_series, cost), sum(len(s.windows) for s in all_series) * cost.tp_weight)
        q = np.percentile(per, [0, 25, 50, 75, 100]) if per else [float("nan")] * 5
        return {"total": total, "raw": total_raw, "series_spread": [float(v) for v in q], "chosen": chosen}

    series_result = leave_series_out(list(range(len(grid))))
    series_before = leave_series_out([grid.index(c) for c in before]) if before else None
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

    def fold_lines(title: str, folds: list[dict[str, Any]], total: float) -> list[str]:
        out = ["", title, "",
               "| held-out category | candidate chosen on the others | its score there | raw |", "| --- | --- | ---: | ---: |"]
        for fold in folds:
            s = "no window" if fold["score"] is None else f"{fold['score']:.2f}"
            out.append(f"| {fold['category']} | {fold['chosen']} | {s} | {fold['raw']:.2f} |")
        scored = [f["score"] for f in folds if f["score"] is not None]
        return out + ["", f"Cross-validated total: **{total:.2f}** (folds: min {min(scored):.2f}, "
                      f"median {float(np.median(scored)):.2f}, max {max(scored):.2f}).", ""]

    lines += fold_lines("## Leave one category out", folds, cv_total)
    if before_result is not None:
        lines += fold_lines(f"## Leave one category out among the `--before` candidates only ({len(before)})",
                            *before_result)

    def series_lines(title: str, r: dict[str, Any]) -> list[str]:
        q = r["series_spread"]
        out = ["", title, "", f"Cross-validated total: **{r['total']:.2f}** (raw {r['raw']:.2f}); per series with "
               f"windows, normalised against its own windows: min {q[0]:.2f}, 25 % {q[1]:.2f}, median {q[2]:.2f}, "
               f"75 % {q[3]:.2f}, max {q[4]:.2f}.", "", "| candidate chosen | series |", "| --- | ---: |"]
        return out + [f"| {c} | {n} |" for c, n in sorted(r["chosen"].items(), key=lambda kv: -kv[1])] + [""]

    lines += series_lines("## Leave one series out", series_result)
    if series_before is not None:
        lines += series_lines(f"## Leave one series out among the `--before` candidates only ({len(before)})",
                              series_before)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"command": command, "totals": {label(grid[i]): v for i, v in totals.items()},
                                                    "folds": folds, "cv_total": cv_total,
                                                    "before": None if before_result is None else
                                                    {"folds": before_result[0], "cv_total": before_result[1]},
                                                    "leave_series_out": series_result,
                                                    "leave_series_out_before": series_before},
                                                   indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
