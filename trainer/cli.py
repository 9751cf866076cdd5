"""``trainer``: fit a model on a CSV (or generated data) and write a versioned artifact."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from stream_detector.profiles import SensorProfile, TransactionProfile
from stream_detector.synthetic import SENSOR_CHANNELS, generate_runs

from .data import CsvSpec, from_synthetic, load_csv
from .fit import TrainConfig, train_and_save


def _csv_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--csv", action="append", default=[], help="CSV file, directory or glob (repeatable; .gz ok)")
    p.add_argument("--sep", default=",", help="column separator (SKAB uses ';')")
    p.add_argument("--key-column", help="column holding the key (default: one key per file)")
    p.add_argument("--time-column", help="timestamp column (default: guessed)")
    p.add_argument("--label-column", help="0/1 anomaly label column; labelled windows are left out of training")
    p.add_argument("--id-column", help="event id column (default: file and row number)")
    p.add_argument("--fields", help="sensors: comma-separated channels (default: every numeric column)")
    p.add_argument("--exclude", default="", help="comma-separated columns to ignore")
    p.add_argument("--amount-column", default="amount", help="transactions: the amount column")
    p.add_argument("--terminal-column", default="terminal_id", help="transactions: the terminal column")
    p.add_argument("--head-rows-per-key", type=int, help="use only each key's first N rows (SKAB: 400)")


def _spec(args: argparse.Namespace) -> CsvSpec:
    return CsvSpec(
        sep=args.sep.encode().decode("unicode_escape"),
        key_column=args.key_column,
        time_column=args.time_column,
        label_column=args.label_column,
        id_column=args.id_column,
        fields=[f for f in args.fields.split(",") if f] if args.fields else None,
        exclude=[c for c in args.exclude.split(",") if c],
        amount_column=args.amount_column,
        terminal_column=args.terminal_column,
        head_rows_per_key=args.head_rows_per_key,
    )


def cmd_train(args: argparse.Namespace) -> int:
    if args.synthetic:
        profile = SensorProfile(SENSOR_CHANNELS) if args.profile == "sensors" else TransactionProfile()
        keys = args.synthetic_keys or (20 if args.profile == "sensors" else 400)
        per_key = args.synthetic_events_per_key or (200 if args.profile == "sensors" else 60)
        runs = 5 if args.profile == "sensors" else 1
        data = from_synthetic(generate_runs(args.profile, keys, per_key, runs, seed=args.seed + 1000), profile)
    elif args.csv:
        data = load_csv(args.csv, args.profile, _spec(args))
    else:
        print("trainer: give --csv PATH or --synthetic", file=sys.stderr)
        return 2
    window = args.window or (32 if args.profile == "sensors" else 16)
    config = TrainConfig(
        window=window, hidden=args.hidden, latent=args.latent, epochs=args.epochs, batch_size=args.batch_size,
        learning_rate=args.learning_rate, threshold_quantile=args.threshold_quantile,
        threshold_margin=args.threshold_margin, seed=args.seed, device=args.device,
    )
    described = data.describe()
    print(f"training {config.model} on {described['events']} events from {described['keys']} keys "
          f"(window {window}, features: {', '.join(data.profile.feature_names)})", flush=True)
    path, result = train_and_save(data.events, data.profile, config, args.out, labels=data.labels,
                                  progress=not args.no_progress, data_description=described)
    m = result.metrics
    summary = {
        "artifact": str(path),
        "model": config.model,
        "profile": data.profile.name,
        "train_windows": m["train_windows"],
        "val_windows": m["val_windows"],
        "epochs_run": m["epochs_run"],
        "best_val_loss": round(m["best_val_loss"], 6),
        "threshold": round(result.threshold["value"], 6),
        "threshold_rule": f"quantile {config.threshold_quantile} of held-out normal scores",
        "seconds": m["seconds"],
        "device": m["device"],
    }
    print("training summary:")
    for k, v in summary.items():
        print(f"  {k:15s} {v}")
    if args.summary_json:
        with open(args.summary_json, "w") as fh:
            json.dump(summary, fh, indent=2)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model and write a versioned artifact")
    p.add_argument("--profile", choices=["sensors", "transactions"], required=True)
    p.add_argument("--synthetic", action="store_true", help="train on generated normal data instead of a CSV")
    p.add_argument("--synthetic-keys", type=int, default=0)
    p.add_argument("--synthetic-events-per-key", type=int, default=0)
    _csv_flags(p)
    p.add_argument("--out", default="artifacts/model", help="model directory; a new version is added inside")
    p.add_argument("--window", type=int, default=0, help="events per window (default: 32 sensors, 16 transactions)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--threshold-quantile", type=float, default=0.999)
    p.add_argument("--threshold-margin", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--summary-json", help="also write the training summary here")
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
