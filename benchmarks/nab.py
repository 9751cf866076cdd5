#!/usr/bin/env python
"""NAB (Numenta Anomaly Benchmark) end to end, with the product's defaults.

    .venv/bin/python benchmarks/nab.py --nab ../shared/nab --out benchmarks/results/nab.md

For each series of the NAB checkout (``data/<category>/<series>.csv``, windows from
``labels/combined_windows.json``):

1. train on its probationary period (NAB's: the first 15 %, at most 750 rows) with the trainer's
   own command and defaults (``trainer train --profile sensors --csv <series> --head-rows-per-key
   <probation>``: the ``value`` column is the one channel; labels are never read);
2. stream the whole series, in order, through ``stream_detector.detector.Detector`` (the worker's
   pipeline, as ``trainer evaluate`` replays it; the probationary part only warms windows and
   per-key statistics up, NAB does not score it);
3. write NAB-format result CSVs (``timestamp,value,anomaly_score,label``) and score them with
   ``trainer/nab.py`` (a port of NAB's scorer, checked against it by ``benchmarks/nab_scorer_check.py``).

Figures per profile: NAB's usual one (the anomaly score is the detector's severity, score /
the key's threshold, mapped monotonically into [0, 1) by ``r / (1 + r)``; NAB picks the threshold
over the corpus) and the alerts as published (1 on each row an alert message of the incident
lifecycle listed, 0 elsewhere; no optimisation), the alert messages as published (1 on the row each
open or update message went out with), and the incident openings alone (1 on each incident's first
over-threshold row). The rolling z-score baseline of
``trainer/baselines.py`` runs through the same harness for comparison (fitted on the probationary
windows, threshold a quantile of its held-out ones, as in ``benchmarks/quality.py``). The stored
results of published detectors in the checkout are re-scored beside them as anchors.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stream_detector.artifacts import load_artifact  # noqa: E402
from stream_detector.preprocessing import ScalerParams  # noqa: E402
from stream_detector.thresholds import fit_quantile_threshold  # noqa: E402
from benchmarks.quality import machine  # noqa: E402  (one description of the machine for every benchmark)
from trainer.baselines import RollingZScoreBaseline, scale_windows  # noqa: E402
from trainer.cli import build_parser  # noqa: E402
from trainer.data import CsvSpec, LoadedData, load_csv  # noqa: E402
from trainer.evaluate import replay  # noqa: E402
from trainer.fit import split_by_key_time, windows_from_events  # noqa: E402
from trainer.nab import (  # noqa: E402
    PROFILES, CostMatrix, ProfileResult, Series, load_profiles, nab_scores, normalise, null_score,
    probation_length, read_windows, severity_to_anomaly_score, window_rows,
)

PROFILE_NAMES = ("standard", "reward_low_FP_rate", "reward_low_FN_rate")
ANCHORS = ("ARTime", "numenta", "windowedGaussian")
BASELINE_QUANTILE = 0.999  # the trainer's default --threshold-quantile


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class NabFile:
    relative: str  # category/series.csv, as in NAB's labels
    path: Path
    timestamps: list[str]
    values: list[str]
    windows: list[tuple[int, int]]

    @property
    def category(self) -> str:
        return self.relative.split("/")[0]

    @property
    def probation_rows(self) -> int:
        """Rows ``i < probation_length(n)``: NAB's probationary period, the training part."""
        return int(math.ceil(probation_length(len(self.timestamps))))


def read_nab_files(nab: Path, only: Sequence[str]) -> list[NabFile]:
    windows = read_windows(nab / "labels" / "combined_windows.json")
    out = []
    for relative in sorted(windows):
        if only and not any(o in relative for o in only):
            continue
        path = nab / "data" / relative
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        times = [r["timestamp"] for r in rows]
        out.append(NabFile(relative, path, times, [r["value"] for r in rows],
                           window_rows(times, windows[relative], relative)))
    return out


# --- training strategies: (series, its data, work dir, threads, seed) -> artifact directory ----------

def train_on_probation(f: NabFile, work: Path, threads: int, seed: int) -> Path:
    """The trainer's own command with its defaults, on the series' probationary period only."""
    out = work / "models" / f.relative.replace("/", "__")
    summary = out / "summary.json"
    args = build_parser().parse_args([
        "train", "--profile", "sensors", "--csv", str(f.path), "--fields", "value",
        "--head-rows-per-key", str(f.probation_rows), "--out", str(out), "--threads", str(threads),
        "--seed", str(seed), "--no-progress", "--device", "cpu", "--summary-json", str(summary)])
    with contextlib.redirect_stdout(io.StringIO()):
        rc = args.func(args)
    if rc:
        raise RuntimeError(f"trainer train failed on {f.relative} (exit {rc})")
    return Path(json.loads(summary.read_text())["artifact"])


TRAINING_STRATEGIES: dict[str, Callable[[NabFile, Path, int, int], Path]] = {"probation": train_on_probation}


# --- detectors -----------------------------------------------------------------------------------

def load_series(f: NabFile, profile: Any) -> LoadedData:
    data = load_csv([str(f.path)], profile, CsvSpec(fields=["value"]))
    if len(data.events) != len(f.timestamps):
        raise ValueError(f"{f.relative}: {len(f.timestamps) - len(data.events)} rows refused ({dict(data.rejected)})")
    return data


def run_product(f: NabFile, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    artifact_dir = TRAINING_STRATEGIES[args.training](f, work, args.threads, args.seed)
    trained = time.perf_counter()
    artifact = load_artifact(artifact_dir)
    data = load_series(f, artifact.profile)
    labels = Series(f.relative, np.zeros(len(f.timestamps)), f.windows).labels()
    result = replay(artifact, data.events, labels.tolist(), batch_events=args.batch_events, device="cpu")
    meta = artifact.metadata.get("training", {})
    return {"anomaly_score": severity_to_anomaly_score(result.severity),
            "alerts": result.published.astype(np.float64),
            "messages": result.notified.astype(np.float64),
            "openings": result.opened.astype(np.float64),
            "over": result.alerted,
            "info": {"train_rows": f.probation_rows, "train_windows": meta.get("train_windows"),
                     "epochs": meta.get("epochs_run"), "threshold": artifact.threshold,
                     "alert_rows": int(result.published.sum()), "over_rows": int(result.alerted.sum()),
                     "messages": int(result.notified.sum()),
                     "incidents": int(result.opened.sum()),
                     "train_s": round(trained - started, 1), "replay_s": round(time.perf_counter() - trained, 1)}}


def run_rolling_zscore(f: NabFile, window: int) -> dict[str, Any]:
    """The baseline on the same windows: fitted on the probation's windows (80 %), threshold the
    trainer's quantile of the held-out 20 %."""
    data = load_series(f, "sensors")
    profile = data.profile
    n_train = f.probation_rows
    train = windows_from_events(data.events[:n_train], profile, window)
    fit_idx, val_idx = split_by_key_time(train, 0.2)
    scaler = ScalerParams.fit(train.windows[fit_idx].reshape(-1, profile.n_features))
    baseline = RollingZScoreBaseline().fit(scale_windows(scaler, train.windows[fit_idx]))
    threshold = fit_quantile_threshold(baseline.score(scale_windows(scaler, train.windows[val_idx])),
                                       BASELINE_QUANTILE)["value"]
    every = windows_from_events(data.events, profile, window)
    scores = np.full(len(data.events), np.nan)
    scores[every.event_index] = baseline.score(scale_windows(scaler, every.windows))
    severity = scores / threshold if threshold > 0 else np.where(scores > 0, np.inf, 0.0)
    over = np.nan_to_num(severity, nan=0.0) > 1.0
    return {"anomaly_score": severity_to_anomaly_score(severity), "over": over.astype(np.float64),
            "info": {"threshold": threshold, "over_rows": int(over.sum())}}


def write_nab_csv(directory: Path, detector: str, f: NabFile, scores: np.ndarray) -> None:
    path = directory / detector / f.category / f"{detector}_{Path(f.relative).name}"
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = Series(f.relative, scores, f.windows).labels()
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["timestamp", "value", "anomaly_score", "label"])
        for t, v, s, y in zip(f.timestamps, f.values, scores, labels):
            w.writerow([t, v, repr(float(s)), int(y)])


def read_stored(nab: Path, detector: str, files: Sequence[NabFile]) -> list[Series] | None:
    out = []
    for f in files:
        path = nab / "results" / detector / f.category / f"{detector}_{Path(f.relative).name}"
        if not path.exists():
            return None
        with open(path, newline="") as fh:
            scores = np.array([float(r["anomaly_score"]) for r in csv.DictReader(fh)])
        out.append(Series(f.relative, scores, f.windows))
    return out


# --- scoring and the report ----------------------------------------------------------------------

def breakdown(series: Sequence[Series], results: dict[str, ProfileResult], profiles: dict[str, CostMatrix]
              ) -> dict[str, Any]:
    """Per profile: total, per category (at the corpus threshold), per series (normalised against
    its own windows; raw cost of false alarms for a series without windows)."""
    out: dict[str, Any] = {}
    for name, r in results.items():
        cost = profiles[name]
        by_name = {s.name: s for s in r.per_series}
        categories: dict[str, Any] = {}
        for cat in sorted({s.name.split("/")[0] for s in series}):
            members = [s for s in series if s.name.split("/")[0] == cat]
            raw = sum(by_name[s.name].score for s in members)
            windows = sum(len(s.windows) for s in members)
            null = null_score(members, cost)
            categories[cat] = {"score": normalise(raw, null, windows * cost.tp_weight), "raw": raw,
                               "windows": windows}
        per_series = {}
        for s in series:
            p = by_name[s.name]
            per_series[s.name] = {"score": normalise(p.score, -cost.fn_weight * p.windows, cost.tp_weight * p.windows)
                                  if p.windows else None, "raw": p.score, "fp": p.fp,
                                  "detected_windows": p.detected_windows, "windows": p.windows}
        out[name] = {"total": r.normalised, "threshold": r.threshold, "raw": r.raw, "categories": categories,
                     "per_series": per_series}
    return out


def leave_one_category_out(series: Sequence[Series], profiles: dict[str, CostMatrix]) -> dict[str, Any]:
    """The optimised figure without choosing the threshold on the series it scores: each category is
    scored at the threshold NAB's optimiser picks on the other categories (never on itself)."""
    from trainer.nab import score_by_threshold, score_series

    cats = sorted({s.name.split("/")[0] for s in series})
    out: dict[str, Any] = {}
    for name, cost in profiles.items():
        raw, categories = 0.0, {}
        for cat in cats:
            held = [s for s in series if s.name.split("/")[0] == cat]
            rest = [s for s in series if s.name.split("/")[0] != cat]
            table = score_by_threshold(rest, cost)
            threshold = float(table.threshold[table.best()])
            cat_raw = sum(score_series(s, cost, threshold).score for s in held)
            windows = sum(len(s.windows) for s in held)
            categories[cat] = {"threshold": threshold, "raw": cat_raw, "windows": windows,
                               "score": normalise(cat_raw, null_score(held, cost), windows * cost.tp_weight)}
            raw += cat_raw
        out[name] = {"total": normalise(raw, null_score(series, cost), sum(len(s.windows) for s in series)
                                        * cost.tp_weight), "raw": raw, "categories": categories}
    return out


def spread(per_series: dict[str, Any]) -> dict[str, Any]:
    values = np.array([v["score"] for v in per_series.values() if v["score"] is not None], dtype=float)
    if not len(values):
        return {"series": 0}
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    return {"series": int(len(values)), "min": float(values.min()), "q1": float(q1), "median": float(med),
            "q3": float(q3), "max": float(values.max())}


def fmt(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.2f}"


def git_commit() -> str:
    try:
        import subprocess

        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - a report without the commit is still a report
        return "unknown"


LABELS = {
    "product": "stream-detector (lstm_ae, defaults): severity, NAB's optimised threshold",
    "product_messages": "stream-detector: published alert messages (open, update), as they stand",
    "product_alerts": "stream-detector: every event listed in the alerts' event_ids, as they stand",
    "product_openings": "stream-detector: incident openings only, as they stand",
    "product_opening_severity": "stream-detector: incident openings by severity, NAB's optimised threshold",
    "rolling_zscore": "rolling z-score baseline: NAB's optimised threshold",
    "rolling_zscore_over": "rolling z-score baseline: over its own threshold, as it stands",
}

CROSS_LABELS = {"product": "stream-detector (lstm_ae, defaults): severity",
                "product_opening_severity": "stream-detector: incident openings by severity",
                "rolling_zscore": "rolling z-score baseline"}


def report(scored: dict[str, dict[str, Any]], cross: dict[str, dict[str, Any]], files: list[NabFile],
           info: dict[str, Any], meta: dict[str, Any]) -> str:
    short = {"standard": "standard", "reward_low_FP_rate": "low FP", "reward_low_FN_rate": "low FN"}
    lines = ["# NAB, end to end with the product's defaults", "",
             f"Measures the detector at commit `{meta['commit']}` of this repository "
             f"(`stream_detector.detector.Detector`, trained by `trainer train` with its defaults).", "",
             f"- Command: `{meta['command']}`",
             f"- Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores, no GPU used; torch "
             f"{meta['machine']['torch']} with {meta['threads']} thread(s); Python {meta['machine']['python']}",
             f"- Data: {len(files)} series, {sum(len(f.windows) for f in files)} windows, "
             f"{sum(len(f.timestamps) for f in files)} rows ({', '.join(sorted({f.category for f in files}))}); "
             f"{meta['seconds']:.0f} s in all", "",
             "Protocol: per series, train on NAB's probationary period (first 15 %, at most 750 rows) with "
             "`trainer train --profile sensors --fields value --head-rows-per-key <probation>` and every other "
             "option at its default (no label read), then replay the whole series in order through the worker's "
             "`Detector` (default threshold policy and incident lifecycle). NAB scores with `trainer/nab.py` "
             "(a port of NAB's scorer that reproduces NAB's own results on the stored detectors: "
             "[nab-scorer-check.md](nab-scorer-check.md)). Nothing was tuned on these series.", "",
             "- *severity, NAB's optimised threshold*: the anomaly score of a row is `r / (1 + r)` with `r` the "
             "window's score over its key's threshold (0 before the window is full); NAB picks one threshold per "
             "profile over all series, as for the published detectors. Any increasing map of `r` gives the same "
             "figure (NAB tries every distinct score as the threshold), so the map is not a tuned choice.",
             "- *published alert messages*: what a subscriber is notified of: 1 on the row each `open` or `update` "
             "message went out with (its `event_id`, the newest over-threshold window then), 0 elsewhere, as it "
             "stands (`close` messages notify nothing new).",
             "- *every event listed in the alerts' event_ids*: 1 on every over-threshold window an alert message "
             "listed as evidence, 0 elsewhere, as it stands. NAB counts only the first detection inside a window "
             "but every one outside it, so each over-threshold window of an incident that outlasts its window, or "
             "opens outside one, counts as one more false alarm: a reading of the evidence lists, not of what a "
             "subscriber is notified of.",
             "- *incident openings only*: 1 on the first over-threshold row of each incident that opened (one "
             "detection per incident, what a pager shows), as it stands.",
             "- *incident openings by severity*: the same rows carrying their window's severity mapped as above, "
             "0 elsewhere; NAB's optimiser can only drop the mildest openings (a user filtering alerts by "
             "severity).",
             "- Anchors: the stored outputs of published detectors on the same series, re-scored by `trainer/nab.py`.",
             "", "## Totals", "", "| detector | standard | low FP | low FN |", "| --- | ---: | ---: | ---: |"]
    for name, res in scored.items():
        label = LABELS.get(name, f"{name} (published, stored results)")
        lines.append(f"| {label} | " + " | ".join(fmt(res[p]["total"]) for p in PROFILE_NAMES) + " |")
    cats = sorted({f.category for f in files})
    if cross:
        lines += ["", "## Threshold chosen on the other categories", "",
                  "NAB chooses each detector's threshold on the very series it scores. Here each category is scored "
                  "at the threshold NAB's optimiser picks on the other categories only (leave one category out); "
                  "normalised as above.", "",
                  "| detector | standard | low FP | low FN | " + " | ".join(f"{c} (standard)" for c in cats) + " |",
                  "| --- | ---: | ---: | ---: |" + " ---: |" * len(cats)]
        for name, res in cross.items():
            cells = [fmt(res[p]["total"]) for p in PROFILE_NAMES]
            for c in cats:
                cat = res["standard"]["categories"][c]
                cells.append(fmt(cat["score"]) if cat["windows"] else f"no window (raw {cat['raw']:.2f})")
            lines.append(f"| {CROSS_LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    for p in PROFILE_NAMES:
        lines += ["", f"## Per category, {short[p]} profile (at the corpus threshold)", "",
                  "| detector | " + " | ".join(cats) + " |", "| --- |" + " ---: |" * len(cats)]
        for name, res in scored.items():
            cells = []
            for c in cats:
                cat = res[p]["categories"][c]
                cells.append(fmt(cat["score"]) if cat["windows"] else f"no window (raw {cat['raw']:.2f})")
            lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    lines += ["", "## Spread across series (standard profile)", "",
              "Each series with windows normalised against its own windows at the corpus threshold (null 0, "
              "perfect 100).", "", "| detector | series | min | 25 % | median | 75 % | max |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, res in scored.items():
        s = spread(res["standard"]["per_series"])
        if s["series"]:
            lines.append(f"| {LABELS.get(name, name)} | {s['series']} | {fmt(s['min'])} | {fmt(s['q1'])} | "
                         f"{fmt(s['median'])} | {fmt(s['q3'])} | {fmt(s['max'])} |")
    lines += ["", "## Per series (standard profile)", "",
              "| series | rows | windows | train rows | epochs | threshold | "
              "severity: score (windows found, FP rows) | "
              "messages: score (windows found, FP rows) | messages | event_ids rows | incidents | baseline score |",
              "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: |"]
    for f in files:
        i = info[f.relative]
        row = []
        for name in ("product", "product_messages"):
            v = scored[name]["standard"]["per_series"][f.relative]
            score = fmt(v["score"]) if v["score"] is not None else f"raw {v['raw']:.2f}"
            row.append(f"{score} ({v['detected_windows']}/{v['windows']}, {v['fp']})")
        base = scored.get("rolling_zscore", {}).get("standard", {}).get("per_series", {}).get(f.relative)
        base_txt = "-" if base is None else (
            fmt(base["score"]) if base["score"] is not None else f"raw {base['raw']:.2f}")
        lines.append(f"| {f.relative} | {len(f.timestamps)} | {len(f.windows)} | {i['train_rows']} | {i['epochs']} | "
                     f"{i['threshold']:.4g} | {row[0]} | {row[1]} | {i['messages']} | {i['alert_rows']} | {i['incidents']} | "
                     f"{base_txt} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nab", required=True, help="NAB checkout: data/, labels/combined_windows.json, config/")
    parser.add_argument("--out", default="benchmarks/results/nab.md", help="markdown report; JSON beside it")
    parser.add_argument("--series", default="", help="comma-separated substrings of series paths to run (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--training", default="probation", choices=sorted(TRAINING_STRATEGIES))
    parser.add_argument("--no-baseline", action="store_true", help="skip the rolling z-score baseline")
    parser.add_argument("--results-dir", help="write the NAB-format result CSVs here (default: a temporary directory)")
    parser.add_argument("--batch-events", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    nab = Path(args.nab)
    profiles_path = nab / "config" / "profiles.json"
    profiles = load_profiles(profiles_path) if profiles_path.exists() else dict(PROFILES)
    files = read_nab_files(nab, [s for s in args.series.split(",") if s])
    if not files:
        raise SystemExit("no NAB series selected")
    with tempfile.TemporaryDirectory(prefix="nab-bench-") as tmp:
        work = Path(tmp)
        results_dir = Path(args.results_dir) if args.results_dir else work / "results"
        outputs: dict[str, list[Series]] = {"product": [], "product_messages": [], "product_alerts": [],
                                            "product_openings": [], "product_opening_severity": []}
        if not args.no_baseline:
            outputs.update({"rolling_zscore": [], "rolling_zscore_over": []})
        info: dict[str, Any] = {}
        for f in files:
            product = run_product(f, work, args)
            info[f.relative] = product["info"]
            window = load_artifact(work / "models" / f.relative.replace("/", "__")).window
            streams = {"product": product["anomaly_score"], "product_messages": product["messages"],
                       "product_alerts": product["alerts"],
                       "product_openings": product["openings"],
                       "product_opening_severity": np.where(product["openings"] > 0, product["anomaly_score"], 0.0)}
            if not args.no_baseline:
                base = run_rolling_zscore(f, window)
                streams.update({"rolling_zscore": base["anomaly_score"], "rolling_zscore_over": base["over"]})
                info[f.relative]["baseline_threshold"] = base["info"]["threshold"]
            for name, scores in streams.items():
                write_nab_csv(results_dir, name, f, scores)
                outputs[name].append(Series(f.relative, scores, f.windows))
            i = product["info"]
            log(f"{f.relative}: {len(f.timestamps)} rows, trained on {i['train_rows']} ({i['epochs']} epochs, "
                f"{i['train_s']} s), replayed in {i['replay_s']} s; {i['alert_rows']} alerted rows, "
                f"{i['incidents']} incidents, {len(f.windows)} windows")
        scored: dict[str, dict[str, Any]] = {}
        cross: dict[str, dict[str, Any]] = {}
        for name, series in outputs.items():
            fixed = name in ("product_messages", "product_alerts", "product_openings", "rolling_zscore_over")
            results = nab_scores(series, profiles, threshold=1.0 if fixed else None)
            scored[name] = breakdown(series, results, profiles)
            if not fixed and len({f.category for f in files}) > 1:
                cross[name] = leave_one_category_out(series, profiles)
        for anchor in ANCHORS:
            stored = read_stored(nab, anchor, files)
            if stored is not None:
                scored[anchor] = breakdown(stored, nab_scores(stored, profiles), profiles)
                if len({f.category for f in files}) > 1:
                    cross[anchor] = leave_one_category_out(stored, profiles)
    seconds = time.perf_counter() - started
    meta = {"command": " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/nab.py",
                                                         *(argv if argv is not None else sys.argv[1:])]),
            "machine": machine(), "threads": args.threads, "seconds": seconds, "commit": git_commit(),
            "training": args.training}
    text = report(scored, cross, files, info, meta)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "series": info, "scores": scored,
                                                    "leave_one_category_out": cross}, indent=2,
                                                   sort_keys=True, default=float))
    for name, res in scored.items():
        log(f"{name:22s} " + "  ".join(f"{p} {fmt(res[p]['total'])}" for p in PROFILE_NAMES))
    log(f"wrote {out} in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
