#!/usr/bin/env python
"""Choosing detection defaults by leaving files out: SKAB valve1, folds of held-out experiments.

    .venv/bin/python benchmarks/detection_cv.py --data ../shared/datasets --out benchmarks/results/detection_cv.md

For each candidate configuration and each fold, a model is trained (the trainer's own code, one
torch thread) on the 400-row anomaly-free heads of the files *not* in the fold, and replayed through
the worker's detector (defaults: per-key adaptive thresholds, the artifact's per-key normal) on:

- ``held-out``: the fold's files, each one's first 400 rows replayed as warm-up, the rest scored
  (SKAB's protocol);
- ``shifted``: the same files moved to another operating regime, every channel multiplied by a
  factor in [0.5, 4] and offset by up to +-2 of its own spreads x 20 (fixed per file and channel):
  with each key judged against its own normal the figures should not move;
- ``anomaly-free``: SKAB's anomaly-free file, its first 400 rows as warm-up, the rest scored (all
  normal: only the false-alarm rate means anything).

Point F1, FAR and MAR are pooled over the fold's files; the table reports the mean and the spread
(min .. max) over folds and seeds. Not a test: it needs the datasets and takes minutes per model.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stream_detector.artifacts import load_artifact  # noqa: E402
from stream_detector.events import Event  # noqa: E402
from stream_detector.surprise import TailConfig  # noqa: E402
from stream_detector.thresholds import ThresholdConfig, build_threshold_policy  # noqa: E402
from trainer.cli import DEFAULTS_BY_PROFILE  # noqa: E402
from trainer.data import CsvSpec, LoadedData, load_csv  # noqa: E402
from trainer.evaluate import evaluate, evaluation_mask, replay  # noqa: E402
from trainer.fit import TrainConfig, train_and_save  # noqa: E402

HEAD = 400

# name -> TrainConfig changes. Every per-key-normal option is spelled out, so a name means the same
# whatever the library's defaults are later; "defaults" is what `trainer train` does with no flag.
CENTRE = {"scale": False, "drift": 0.1, "drift_cap": 3.0}
SCALED = {"scale": True, "drift": 0.1, "drift_cap": 3.0}
SCALED_FAST = {"scale": True, "drift": 0.3, "drift_cap": 1.0}
CANDIDATES: dict[str, dict[str, Any]] = {
    "defaults": dict(DEFAULTS_BY_PROFILE["sensors"]),
    "steps1-q999-centre": {"score_steps": 1, "threshold_quantile": 0.999, "key_normal_options": CENTRE},
    "steps8-q99-centre": {"score_steps": 8, "threshold_quantile": 0.99, "key_normal_options": CENTRE},
    "steps8-q99-centre-frozen": {"score_steps": 8, "threshold_quantile": 0.99,
                                 "key_normal_options": {**CENTRE, "drift": 0.0}},
    "steps8-q99-centre-slow": {"score_steps": 8, "threshold_quantile": 0.99,
                               "key_normal_options": {**CENTRE, "drift": 0.02}},
    "steps8-q99-scaled": {"score_steps": 8, "threshold_quantile": 0.99, "key_normal_options": SCALED},
    "steps8-q99-scaled-fast": {"score_steps": 8, "threshold_quantile": 0.99, "key_normal_options": SCALED_FAST},
    "steps8-q95-scaled": {"score_steps": 8, "threshold_quantile": 0.95, "key_normal_options": SCALED},
    "steps8-q95-scaled-fast": {"score_steps": 8, "threshold_quantile": 0.95, "key_normal_options": SCALED_FAST},
    "steps8-q99-no-key-normal": {"score_steps": 8, "threshold_quantile": 0.99, "key_normal_blocks": 0},
}


def skab_spec(head: int | None = None) -> CsvSpec:
    return CsvSpec(sep=";", time_column="datetime", label_column="anomaly", exclude=("changepoint",),
                   head_rows_per_key=head)


def by_keys(data: LoadedData, keys: set[str]) -> tuple[list[Event], list[int]]:
    pairs = [(e, lab) for e, lab in zip(data.events, data.labels) if e.key in keys]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def shifted(events: Sequence[Event], seed: int) -> list[Event]:
    """Every key moved to another regime: per key and channel, x -> a * x + b."""
    rng = np.random.default_rng(seed)
    keys = sorted({e.key for e in events})
    n_fields = len(events[0].values)
    spread = np.std(np.array([e.values for e in events], dtype=np.float64), axis=0) + 1e-9
    affine = {k: (rng.uniform(0.5, 4.0, n_fields), rng.uniform(-2.0, 2.0, n_fields) * spread * 20) for k in keys}
    out = []
    for e in events:
        a, b = affine[e.key]
        out.append(Event(e.key, e.event_id, e.timestamp, tuple(float(v) for v in np.asarray(e.values) * a + b)))
    return out


def policy_for(name: str, artifact) -> Any:
    """A threshold policy by name: ``default`` (the worker's), ``adaptive`` (tail calibration off),
    ``tail:field=value,...`` (tail calibration with those TailConfig fields, e.g.
    ``tail:alert_surprise=6,values=0``)."""
    if name == "default":
        return None
    if name == "adaptive":
        return build_threshold_policy(artifact, ThresholdConfig(tail=TailConfig(enabled=False)))
    if name.startswith("tail:"):  # tail:alert_surprise=6,values=0,learn_clip=3
        fields = {k: v for k, v in (part.split("=") for part in name[5:].split(",") if part)}
        types = {f: type(getattr(TailConfig(), f)) for f in fields}
        config = TailConfig(**{f: (v not in ("0", "false")) if types[f] is bool else types[f](v)
                               for f, v in fields.items()})
        return build_threshold_policy(artifact, ThresholdConfig(tail=config))
    raise SystemExit(f"unknown policy {name!r}")


def score(artifact, events: list[Event], labels: list[int], policy: str = "default") -> dict[str, Any]:
    result = replay(artifact, events, labels, device="cpu", threshold=policy_for(policy, artifact))
    result.evaluated = evaluation_mask(events, HEAD)
    m = evaluate(result)
    return {k: m.get(k) for k in ("f1", "far", "mar", "precision", "recall", "average_precision", "tp", "fp", "tn", "fn")}


def spread(values: list[float]) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "-"
    return f"{np.mean(v):.3f} ({min(v):.3f} .. {max(v):.3f})"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/datasets")
    p.add_argument("--out", default="benchmarks/results/detection_cv.md")
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--candidates", nargs="+", default=list(CANDIDATES))
    p.add_argument("--policies", nargs="+", default=["default"],
                   help="threshold policies to replay each model with: default, adaptive, tail:field=value,...")
    p.add_argument("--epochs", type=int, default=0, help="override the trainer's epochs (0: its default)")
    p.add_argument("--mixed-regimes", action="store_true",
                   help="move every training file to its own regime too (one model across regimes)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    skab = Path(args.data) / "skab"
    full = load_csv([str(skab / "valve1")], "sensors", skab_spec())
    free = load_csv([str(skab / "anomaly-free")], full.profile, replace(skab_spec(), label_column=None))
    keys = sorted({e.key for e in full.events}, key=lambda k: int(k) if k.isdigit() else k)
    folds = [set(keys[i::args.folds]) for i in range(args.folds)]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.candidates:
            changes = dict(CANDIDATES[name])
            if args.epochs:
                changes["epochs"] = args.epochs
            for seed in args.seeds:
                for f, held in enumerate(folds):
                    train_keys = set(keys) - held
                    heads = load_csv([str(skab / "valve1")], full.profile, skab_spec(HEAD))
                    train_events, train_labels = by_keys(heads, train_keys)
                    if args.mixed_regimes:
                        train_events = shifted(train_events, 200 + f)
                    config = replace(TrainConfig(window=32, seed=seed, threads=1), **changes)
                    t0 = time.perf_counter()
                    path, result = train_and_save(train_events, full.profile, config, Path(tmp) / f"{name}-{seed}-{f}",
                                                  labels=train_labels, progress=False)
                    artifact = load_artifact(path)
                    events, labels = by_keys(full, held)
                    train_s = round(time.perf_counter() - t0, 1)
                    for policy in args.policies:
                        label = name if policy == "default" else f"{name} / {policy}"
                        row = {"candidate": label, "changes": name, "seed": seed, "fold": f, "held_out": sorted(held),
                               "epochs_run": result.metrics["epochs_run"], "train_s": train_s,
                               "held_out_metrics": score(artifact, events, labels, policy),
                               "shifted_metrics": score(artifact, shifted(events, 100 + f), labels, policy),
                               "anomaly_free_metrics": score(artifact, free.events, free.labels, policy)}
                        rows.append(row)
                        h, s, a = row["held_out_metrics"], row["shifted_metrics"], row["anomaly_free_metrics"]
                        write_report(args, rows, time.perf_counter() - started)  # partial results survive a stop
                        print(f"{label} seed {seed} fold {f}: F1 {h['f1']:.3f} FAR {h['far']:.3f} MAR {h['mar']:.3f} | "
                              f"shifted F1 {s['f1']:.3f} FAR {s['far']:.3f} | anomaly-free FAR {a['far']:.4f} "
                              f"({row['epochs_run']} epochs, {row['train_s']} s)", flush=True)
    write_report(args, rows, time.perf_counter() - started)
    return 0


def write_report(args: argparse.Namespace, rows: list[dict[str, Any]], seconds: float) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Detection defaults by cross-validation (SKAB valve1, files left out)"
        + (": training files in mixed regimes" if args.mixed_regimes else ""),
        "",
        f"Command: `{shlex.join(['.venv/bin/python', 'benchmarks/detection_cv.py', *sys.argv[1:]])}`  ",
        f"Machine: {platform.machine()}, {platform.processor() or platform.platform()}, 1 torch thread, no GPU; "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, {seconds / 60:.1f} min.",
        "",
        f"{args.folds} folds of held-out experiment files (file i in fold i mod {args.folds}); per fold a model is "
        "trained on the other files' 400-row heads and replayed through the detector with its defaults. "
        "Figures: mean (min .. max) over folds and seeds "
        f"({', '.join(map(str, args.seeds))}). `shifted`: the held-out files with every channel "
        "multiplied and offset per file (another operating regime); `anomaly-free FAR`: false alarms on "
        "SKAB's anomaly-free file after its first 400 rows.",
        "",
        "| candidate | changes | F1 held-out | FAR held-out | MAR held-out | F1 shifted | FAR shifted | anomaly-free FAR | epochs run |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in dict.fromkeys(r["candidate"] for r in rows):
        mine = [r for r in rows if r["candidate"] == name]
        col = lambda part, m: spread([r[part][m] for r in mine])  # noqa: E731
        changes = ", ".join(f"{k}={v}" for k, v in CANDIDATES[mine[0].get("changes", name)].items()) or "(none)"
        epochs = spread([float(r["epochs_run"]) for r in mine]).split(" ")[0]
        lines.append(f"| {name} | {changes} | {col('held_out_metrics', 'f1')} | {col('held_out_metrics', 'far')} | "
                     f"{col('held_out_metrics', 'mar')} | {col('shifted_metrics', 'f1')} | {col('shifted_metrics', 'far')} | "
                     f"{col('anomaly_free_metrics', 'far')} | {epochs} |")
    lines += ["", "Per fold:", "", "| candidate | seed | fold | held-out files | F1 | FAR | MAR | F1 shifted | anomaly-free FAR |",
              "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        h, s, a = r["held_out_metrics"], r["shifted_metrics"], r["anomaly_free_metrics"]
        lines.append(f"| {r['candidate']} | {r['seed']} | {r['fold']} | {', '.join(r['held_out'])} | {h['f1']:.3f} | "
                     f"{h['far']:.3f} | {h['mar']:.3f} | {s['f1']:.3f} | {a['far']:.4f} |")
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    raise SystemExit(main())
