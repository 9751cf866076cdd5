"""``trainer``: fit a model on a CSV (or generated data) and write a versioned artifact
(``trainer train``), or replay a labelled CSV through a trained model and the worker's detector
and report detection quality (``trainer evaluate``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np

from stream_detector.events import parse_timestamp
from stream_detector.models import MODEL_KINDS
from stream_detector.profiles import SensorProfile, TransactionProfile
from stream_detector.synthetic import SENSOR_CHANNELS, generate_runs

from .data import CsvSpec, LoadedData, from_synthetic, load_csv
from .fit import TrainConfig, train_and_save


def _csv_flags(p: argparse.ArgumentParser) -> None:
    _jsonl_flags(p)
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
    p.add_argument("--skip-rows-per-key", type=int, help="drop each key's first N rows")


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
        skip_rows_per_key=args.skip_rows_per_key,
    )


def _model_options(items: Sequence[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"trainer: --model-option takes NAME=VALUE, got {item!r}")
        try:
            options[name.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            options[name.strip()] = raw
    return options


def _merge(base: LoadedData, extra: LoadedData) -> LoadedData:
    if extra.profile.to_config() != base.profile.to_config():
        raise SystemExit("trainer: --extra-normal-csv has other features than --csv")
    events = base.events + extra.events
    labels = base.labels + [0] * len(extra.events)
    order = sorted(range(len(events)), key=lambda i: events[i].timestamp)
    return LoadedData([events[i] for i in order], [labels[i] for i in order], base.profile,
                      base.rejected + extra.rejected, base.files + extra.files)


def _profile(args: argparse.Namespace) -> str | TransactionProfile:
    """The profile to train: a name (sensors; built from the CSV's columns) or, for transactions, the
    profile with its options."""
    if args.profile != "transactions":
        if args.robust_features or args.context_fields:
            raise SystemExit("trainer: --robust-features and --context-fields are transactions options")
        return args.profile
    fields = [f for f in (args.context_fields or "").split(",") if f]
    return TransactionProfile(robust_features=args.robust_features, context_fields=fields)


# Defaults that differ by profile. Sensors: chosen by leaving SKAB valve1 files out
# (benchmarks/detection_cv.py, benchmarks/results/detection_cv.md); transactions keep theirs.
DEFAULTS_BY_PROFILE: dict[str, dict[str, Any]] = {
    "sensors": {"score_steps": 8, "threshold_quantile": 0.99},
    "transactions": {"score_steps": 1, "threshold_quantile": 0.999},
}


def cmd_train(args: argparse.Namespace) -> int:
    signing_key = _signing_key(args)
    profile_choice = _profile(args)
    topic_read = None
    if args.synthetic:
        if args.context_fields:
            print("trainer: generated transactions carry no context fields", file=sys.stderr)
            return 2
        profile = SensorProfile(SENSOR_CHANNELS) if args.profile == "sensors" else profile_choice
        keys = args.synthetic_keys or (20 if args.profile == "sensors" else 400)
        per_key = args.synthetic_events_per_key or (200 if args.profile == "sensors" else 60)
        runs = 5 if args.profile == "sensors" else 1
        data = from_synthetic(generate_runs(args.profile, keys, per_key, runs, seed=args.seed + 1000), profile)
    elif args.from_topic:
        topic_read = _topic_data(args, profile_choice)
        data = topic_read.data
    elif args.jsonl:
        data = _jsonl_data(args, profile_choice)
    elif args.csv:
        data = load_csv(args.csv, profile_choice, _spec(args))
        if args.extra_normal_csv:
            spec = _spec(args)
            spec.label_column, spec.head_rows_per_key, spec.skip_rows_per_key = None, None, None
            data = _merge(data, load_csv(args.extra_normal_csv, data.profile, spec))
    else:
        print("trainer: give --csv PATH, --jsonl PATH, --from-topic TOPIC or --synthetic", file=sys.stderr)
        return 2
    if args.feedback_jsonl:
        if not args.alerts_jsonl:
            print("trainer: --feedback-jsonl needs --alerts-jsonl (a dump of the alerts topic: the incidents' "
                  "events)", file=sys.stderr)
            return 2
        from stream_detector.feedback import read_feedback_jsonl

        from .feedback import apply_verdicts, read_alerts_jsonl

        try:
            verdicts = read_feedback_jsonl(args.feedback_jsonl)
            alerts = read_alerts_jsonl(args.alerts_jsonl)
        except (OSError, ValueError) as exc:
            print(f"trainer: {exc}", file=sys.stderr)
            return 2
        data.labels, relabelled = apply_verdicts([e.event_id for e in data.events], data.labels, verdicts, alerts)
        print(f"feedback: {len(verdicts)} verdicts; {relabelled['true_positive']} events of true positives left "
              f"out as anomalous, {relabelled['false_positive']} events of false positives kept as normal", flush=True)
    window = args.window or (32 if args.profile == "sensors" else 16)
    defaults = DEFAULTS_BY_PROFILE[args.profile]
    config = TrainConfig(
        model=args.model, window=window, hidden=args.hidden, latent=args.latent, layers=args.layers,
        score_steps=args.score_steps or min(defaults["score_steps"], window), epochs=args.epochs,
        batch_size=args.batch_size, learning_rate=args.learning_rate, patience=args.patience,
        val_fraction=args.val_fraction, threshold_rule=args.threshold_rule,
        threshold_quantile=args.threshold_quantile or defaults["threshold_quantile"],
        threshold_margin=args.threshold_margin, max_train_windows=args.max_train_windows,
        context_noise=args.context_noise, class_weight=args.class_weight,
        model_options=_model_options(args.model_option), seed=args.seed, device=args.device, threads=args.threads,
        key_normal_blocks=args.key_normal_blocks,
        key_normal_options={} if args.key_normal_scale is None else {"scale": args.key_normal_scale},
    )
    if not data.events:
        print("trainer: no valid events to train on", file=sys.stderr)
        return 2
    described = topic_read.describe() if topic_read is not None else data.describe()
    print(f"training {config.model} on {described['events']} events from {described['keys']} keys "
          f"(window {window}, features: {', '.join(data.profile.feature_names)})", flush=True)
    path, result = train_and_save(data.events, data.profile, config, args.out, labels=data.labels,
                                  progress=not args.no_progress, data_description=described,
                                  signing_key=signing_key, train_from=_time_flag(args.train_from),
                                  train_until=_time_flag(args.train_until))
    _register_trained(args, path)
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
        "threshold_rule": _threshold_rule(result.threshold),
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


def _threshold_rule(record: dict[str, Any]) -> str:
    if record.get("method") == "max_f1":
        return f"best F1 ({record['f1']:.3f}) on held-out labelled windows"
    return f"quantile {record.get('quantile')} of held-out normal scores x {record.get('margin', 1.0)}"


def _time_flag(text: str | None) -> float | None:
    if text is None:
        return None
    value: Any = text
    try:
        value = float(text)
    except ValueError:
        pass
    ts = parse_timestamp(value)
    if ts is None:
        raise SystemExit(f"trainer: unreadable time {text!r} (ISO-8601 or epoch seconds)")
    return ts


def cmd_evaluate(args: argparse.Namespace) -> int:
    from stream_detector.artifacts import load_artifact
    from stream_detector.scoring import configure_threads

    from .evaluate import (
        evaluate, evaluation_mask, format_nab, format_table, nab_evaluation, replay, window_ids_from_labels,
        window_ids_from_nab, write_json, write_plots,
    )
    from .nab import read_windows

    if not args.csv and not args.jsonl and not args.from_topic:
        print("trainer: give --csv PATH (a labelled CSV), --jsonl PATH (a labelled topic dump) or --from-topic TOPIC "
              "--with-feedback (the topic, labelled by operators' verdicts)", file=sys.stderr)
        return 2
    if args.from_topic and not args.with_feedback:
        print("trainer: evaluate --from-topic needs --with-feedback: the labels are the operators' verdicts",
              file=sys.stderr)
        return 2
    if not args.label_column and not args.nab_windows and not args.jsonl and not args.from_topic:
        print("trainer: give --label-column (the 0/1 anomaly label) or --nab-windows (NAB's windows JSON)",
              file=sys.stderr)
        return 2
    if not 0 <= args.nab_probation < 1:
        print("trainer: --nab-probation is a fraction in [0, 1)", file=sys.stderr)
        return 2
    configure_threads(args.threads)
    started = time.perf_counter()
    artifact = load_artifact(args.model_dir)
    unreviewed: set[str] = set()
    if args.from_topic:  # labels: events of true_positive incidents 1, the rest 0; unreviewed incidents left out
        read = _topic_data(args, artifact.profile)
        data, unreviewed = read.data, read.unreviewed
    elif args.jsonl:
        data = _jsonl_data(args, artifact.profile)
    else:
        data = load_csv(args.csv, artifact.profile, _spec(args))
    if not data.events:
        print("trainer: no valid events in the input", file=sys.stderr)
        return 2
    keys = [e.key for e in data.events]
    if args.nab_windows:
        try:
            window_ids, matched = window_ids_from_nab(keys, np.array([e.timestamp for e in data.events]),
                                                      read_windows(args.nab_windows))
        except (OSError, ValueError) as exc:  # unreadable file, ambiguous key, bad window limits
            print(f"trainer: --nab-windows {args.nab_windows}: {exc}", file=sys.stderr)
            return 2
        missing = sorted(set(keys) - set(matched))
        if missing:
            print(f"trainer: no series of {args.nab_windows} for key(s) {', '.join(missing[:10])}", file=sys.stderr)
            return 2
        data.labels = [int(bool(y) or w >= 0) for y, w in zip(data.labels, window_ids)]
    else:
        window_ids = window_ids_from_labels(keys, data.labels)
    policy = None
    if args.global_threshold:
        from stream_detector.thresholds import GlobalThreshold

        policy = GlobalThreshold(artifact.threshold)
    elif args.no_tail_calibration:
        from stream_detector.surprise import TailConfig
        from stream_detector.thresholds import ThresholdConfig, build_threshold_policy

        policy = build_threshold_policy(artifact, ThresholdConfig(tail=TailConfig(enabled=False)), args.max_keys)
    result = replay(artifact, data.events, data.labels, batch_events=args.batch_events, device=args.device,
                    max_keys=args.max_keys, threshold=policy)
    result.evaluated = evaluation_mask(data.events, args.warmup_rows_per_key, _time_flag(args.eval_from),
                                       _time_flag(args.eval_until))
    if unreviewed:
        result.evaluated &= np.array([e.event_id not in unreviewed for e in data.events], dtype=bool)
        print(f"--with-feedback: {len(unreviewed)} events of incidents without a verdict replayed but not evaluated")
    metrics = evaluate(result)
    nab = nab_evaluation(result, window_ids, args.nab_probation)
    print(f"evaluated {artifact.kind} {artifact.version} on {metrics['events']} events of {metrics['keys']} keys "
          f"({metrics['replayed_events']} replayed; threshold policy {result.model['threshold_policy']})")
    print(format_table(metrics))
    print(format_nab(nab))
    payload = {
        "metrics": metrics,
        "nab": nab,
        "model": result.model,
        "data": data.describe(),
        "protocol": {"warmup_rows_per_key": args.warmup_rows_per_key, "eval_from": args.eval_from,
                     "eval_until": args.eval_until, "nab_windows": args.nab_windows,
                     "nab_windows_from": "NAB windows file" if args.nab_windows else "contiguous labelled segments",
                     "unscored_events": "events before their key's window is full are not scored: counted as "
                                        "not alerted, left out of average precision and ROC-AUC"},
        "command": " ".join(sys.argv),
        "evaluated_at": datetime.now(timezone.utc).isoformat(),
        "seconds": round(time.perf_counter() - started, 2),
    }
    if args.plots:
        payload["plots"] = write_plots(result, args.plots, max_keys=args.plot_keys)
        print(f"plots: {', '.join(payload['plots'])}")
    if args.json:
        write_json(args.json, payload)
        print(f"metrics JSON: {args.json}")
    return 0


from trainer.jsonl_cli import _jsonl_data, _jsonl_flags  # noqa: E402
from trainer.topic_cli import _topic_data, _topic_flags  # noqa: E402
from trainer.lifecycle_cli import add_lifecycle_commands  # noqa: E402
from trainer.registry_cli import (  # noqa: E402  (registry subcommands live in their own module)
    _register_trained, _registry_train_flags, _signing_key, add_registry_commands,
)


def _evaluate_topic_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from-topic", metavar="TOPIC",
                   help="evaluate on this topic's history (as train --from-topic reads it), labelled by the feedback "
                        "topic's verdicts: needs --with-feedback")
    p.add_argument("--with-feedback", action="store_true",
                   help="--from-topic: events of true_positive incidents are anomalies, those of false_positive ones "
                        "and every event never alerted on normal; events of incidents without a verdict are "
                        "replayed but not evaluated")
    p.add_argument("--since", metavar="TIME", help="--from-topic: first record time")
    p.add_argument("--until", metavar="TIME", help="--from-topic: records before this time")
    p.add_argument("--config", metavar="FILE", help="--from-topic: TOML settings file, as for stream-detector")
    p.add_argument("--bootstrap-servers", metavar="SERVERS", help="--from-topic: Kafka bootstrap servers")
    p.add_argument("--alerts-topic", metavar="TOPIC", help="--from-topic: the alerts topic naming incidents' events")
    p.add_argument("--read-timeout", type=float, default=30.0, metavar="SECONDS")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model and write a versioned artifact")
    p.add_argument("--profile", choices=["sensors", "transactions"], required=True)
    p.add_argument("--synthetic", action="store_true", help="train on generated normal data instead of a CSV")
    p.add_argument("--synthetic-keys", type=int, default=0)
    p.add_argument("--synthetic-events-per-key", type=int, default=0)
    _csv_flags(p)
    _topic_flags(p)
    p.add_argument("--out", default="artifacts/model", help="model directory; a new version is added inside")
    p.add_argument("--feedback-jsonl", metavar="FILE",
                   help="a dump of the feedback topic (stream-detector ack): events of true-positive incidents are "
                        "labelled anomalous (left out of unsupervised training), those of false positives normal")
    p.add_argument("--alerts-jsonl", metavar="FILE",
                   help="with --feedback-jsonl: a dump of the alerts topic, naming each incident's events")
    p.add_argument("--train-from", metavar="TIME",
                   help="fit only windows whose newest event is at or after TIME (ISO-8601 or epoch seconds); "
                        "earlier events warm each key's window and state up")
    p.add_argument("--train-until", metavar="TIME", help="fit only windows whose newest event is before TIME")
    p.add_argument("--robust-features", action="store_true",
                   help="transactions: add amount_to_key_median and log_tx_last_day to the per-key features")
    p.add_argument("--context-fields", help="transactions: comma-separated extra numeric event fields (CSV "
                                            "columns of the same names) used as features as they are")
    p.add_argument("--extra-normal-csv", action="append", default=[],
                   help="more normal training data, read whole (no label, no --head-rows-per-key); repeatable")
    p.add_argument("--model", default="lstm_ae", choices=sorted(MODEL_KINDS),
                   help="model kind (default lstm_ae; lstm_classifier needs --label-column)")
    p.add_argument("--model-option", action="append", default=[], metavar="NAME=VALUE",
                   help="extra constructor argument of the model kind, e.g. critic_weight=0.3 (repeatable)")
    p.add_argument("--window", type=int, default=0, help="events per window (default: 32 sensors, 16 transactions)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--layers", type=int, default=1, help="LSTM layers (lstm_ae, lstm_classifier)")
    p.add_argument("--score-steps", type=int, default=None,
                   help="newest events whose error is the score (autoencoders; default 8 for sensors, 1 for "
                        "transactions: chosen by leaving SKAB files out, benchmarks/results/detection_cv.md)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--patience", type=int, default=4, help="epochs without held-out improvement before stopping")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--val-fraction", type=float, default=0.2, help="latest share of each key's windows held out")
    p.add_argument("--max-train-windows", type=int, default=200_000,
                   help="sub-sample training windows beyond this (supervised: all anomalies are kept)")
    p.add_argument("--class-weight", default="balanced", choices=["balanced", "sqrt", "none"],
                   help="supervised: weight of anomalies in the loss: normal/anomalous windows, its square root, or 1")
    p.add_argument("--context-noise", type=float, default=0.1, help="denoising corruption rate (autoencoders)")
    p.add_argument("--threshold-rule", default="auto", choices=["auto", "quantile", "f1"],
                   help="auto: quantile of held-out normal scores (unsupervised), best F1 on held-out "
                        "labelled windows (supervised)")
    p.add_argument("--threshold-quantile", type=float, default=None,
                   help="quantile of held-out normal scores that is the alert threshold (default 0.99 for sensors, "
                        "0.999 for transactions)")
    p.add_argument("--threshold-margin", type=float, default=1.0)
    p.add_argument("--key-normal-blocks", type=int, default=None,
                   help="each key's own normal: warm-up in windows (default 0 = off; 8 = the first 256 events at window 32)")
    p.add_argument("--key-normal-scale", action=argparse.BooleanOptionalAction, default=None,
                   help="divide by each key's own spread too, not only centre on its level (default: on)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--summary-json", help="also write the training summary here")
    _registry_train_flags(p)
    p.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="replay a labelled CSV through a model and the detector; report quality")
    e.add_argument("--model-dir", default="artifacts/model", help="artifact version directory, or a model directory")
    _csv_flags(e)
    _evaluate_topic_flags(e)
    e.add_argument("--warmup-rows-per-key", type=int, default=0,
                   help="replay but do not evaluate each key's first N events (SKAB: 400, the training part)")
    e.add_argument("--eval-from", help="evaluate events from this time on (ISO-8601 or epoch seconds)")
    e.add_argument("--eval-until", help="evaluate events before this time")
    e.add_argument("--nab-windows", help="NAB windows JSON (labels/combined_windows.json format): the anomaly "
                                         "windows of each key (matched by file name); no --label-column needed")
    e.add_argument("--nab-probation", type=float, default=0.15,
                   help="NAB score: share of each key's evaluated events not scored (NAB's probationary "
                        "period, at most 5000 times it: 750 events at 0.15)")
    e.add_argument("--json", help="write the metrics (and what was run) as JSON here")
    e.add_argument("--plots", help="write PNG plots into this directory")
    e.add_argument("--plot-keys", type=int, default=4, help="keys to plot scores of")
    e.add_argument("--global-threshold", action="store_true",
                   help="judge every key against the artifact's global threshold instead of the worker's "
                        "default policy (per-key tail calibration)")
    e.add_argument("--no-tail-calibration", action="store_true",
                   help="judge keys by per-key adaptive thresholds, as the worker does with tail_calibration=false")
    e.add_argument("--batch-events", type=int, default=1024, help="events per micro-batch")
    e.add_argument("--max-keys", type=int, default=100_000)
    e.add_argument("--device", default="cpu")
    e.add_argument("--threads", type=int, default=0)
    e.set_defaults(func=cmd_evaluate)
    add_registry_commands(sub)
    add_lifecycle_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
