"""`trainer compare` and `trainer retrain` (see :mod:`trainer.lifecycle`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from stream_detector.artifacts import ArtifactError, load_artifact
from stream_detector.registry import CHALLENGER, CHAMPION, read_aliases, set_alias
from stream_detector.settings import Settings, SettingsError

from .compare import GateConfig, format_comparison, gate
from .lifecycle import GATE_FAILED, CompareInputs, alias_set_at, champion_recipe, compare_live, decide
from .topic import parse_time_flag


def _connection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", default="artifacts/model", help="the model directory the worker serves")
    p.add_argument("--config", metavar="FILE", help="TOML settings file, as for stream-detector (topics, broker)")
    p.add_argument("--bootstrap-servers", metavar="SERVERS", help="Kafka bootstrap servers (default: the setting)")
    p.add_argument("--metrics-url", action="append", default=[], metavar="URL",
                   help="a worker's /metrics page (repeatable, one per worker): adds both models' windows judged, "
                        "over-threshold rates and agreement")
    p.add_argument("--match-slack", type=float, default=0.0, metavar="SECONDS",
                   help="incidents of the two models on one key match when their event-time spans, widened by "
                        "this, overlap")
    p.add_argument("--read-timeout", type=float, default=30.0, metavar="SECONDS")
    p.add_argument("--signing-key", metavar="PATH", help="HMAC-SHA256 key file artifacts must be signed with")


def _gate_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-shadow-s", type=float, default=3600.0,
                   help="the challenger must have shadowed this long before the gate decides (default one hour)")
    p.add_argument("--max-alarm-ratio", type=float, default=1.0,
                   help="the challenger may open at most this many incidents per champion incident")
    p.add_argument("--max-missed-true-positives", type=int, default=0,
                   help="champion incidents confirmed true_positive that the challenger may miss")
    p.add_argument("--min-challenger-windows", type=float, default=0.0,
                   help="windows the challenger must have judged (read from --metrics-url)")
    p.add_argument("--max-over-ratio", type=float, default=1.0,
                   help="with --metrics-url: the challenger's share of windows over its threshold may be at most "
                        "this many times the champion's")


def _gate_config(args: argparse.Namespace) -> GateConfig:
    return GateConfig(args.min_shadow_s, args.max_alarm_ratio, args.max_missed_true_positives,
                      args.min_challenger_windows, args.max_over_ratio)


def _inputs(args: argparse.Namespace) -> CompareInputs:
    from stream_detector.kafka.security import client_config

    try:
        settings = Settings.load(args.config, overrides={"bootstrap_servers": args.bootstrap_servers})
    except SettingsError as exc:
        raise SystemExit(f"trainer: {exc}") from None
    return CompareInputs(settings, client_config(settings, "consumer"), args.read_timeout,
                         tuple(args.metrics_url), args.match_slack)


def _signing(args: argparse.Namespace) -> bytes | None:
    from stream_detector.artifacts import read_signing_key

    return read_signing_key(args.signing_key) if args.signing_key else None


def cmd_compare(args: argparse.Namespace) -> int:
    try:
        since = parse_time_flag(args.since) if args.since else None
        result = compare_live(args.model_dir, _inputs(args), since)
    except (ArtifactError, ValueError, TimeoutError, OSError) as exc:
        print(f"trainer: {exc}", file=sys.stderr)
        return 1
    print(format_comparison(result))
    passed, reasons = gate(result, _gate_config(args))
    print("gate: " + ("passes" if passed else "does not pass: " + "; ".join(reasons)))
    if args.json:
        Path(args.json).write_text(json.dumps({"comparison": result.to_dict(), "gate": {
            "passes": passed, "reasons": reasons, "config": dataclasses.asdict(_gate_config(args))}}, indent=2))
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    root = Path(args.model_dir)
    signing_key = _signing(args)
    try:
        aliases = read_aliases(root)["aliases"]
    except ArtifactError as exc:
        print(f"trainer: {exc}", file=sys.stderr)
        return 1
    challenger = aliases.get(CHALLENGER)
    summary: dict[str, object] = {"model_dir": str(root), "champion": aliases.get(CHAMPION), "challenger": challenger}
    if challenger is not None and challenger != aliases.get(CHAMPION):
        try:
            result = compare_live(root, _inputs(args))
        except (ArtifactError, ValueError, TimeoutError, OSError) as exc:
            print(f"trainer: cannot compare the challenger: {exc}", file=sys.stderr)
            return 1
        print(format_comparison(result))
        try:
            outcome, reasons = decide(root, result, _gate_config(args), signing_key)
        except ArtifactError as exc:  # the challenger no longer loads: never promoted
            print(f"trainer: challenger {challenger} not promoted: {exc}", file=sys.stderr)
            return 1
        summary.update(action=outcome, reasons=reasons, comparison=result.to_dict())
        if outcome == "promoted":
            print(f"gate passed: {challenger} promoted to {CHAMPION} (the worker serves it from its next model poll)")
        elif outcome == "waiting":
            set_at = alias_set_at(root, CHALLENGER) or time.time()
            left = max(0.0, args.min_shadow_s - (time.time() - set_at))
            print(f"challenger {challenger} is shadowing; the gate decides in {left:.0f} s: {'; '.join(reasons)}")
        else:
            print(f"gate failed, challenger {challenger} retired: {'; '.join(reasons)}")
        _write_summary(args, summary)
        return GATE_FAILED if outcome == "retired" else 0
    if not args.from_topic:
        print("trainer: no challenger is set, and training one needs --from-topic TOPIC (the input topic)",
              file=sys.stderr)
        return 2
    if args.min_drift > 0:
        drift = _max_drift(args)
        if drift is None:
            return 2
        summary["max_feature_drift"] = drift
        if drift < args.min_drift:
            print(f"largest feature drift {drift:.3f} < --min-drift {args.min_drift:g}: no candidate trained")
            summary.update(action="no_drift")
            _write_summary(args, summary)
            return 0
        print(f"largest feature drift {drift:.3f} >= --min-drift {args.min_drift:g}: training a candidate")
    version = _train_candidate(args, root, signing_key)
    if version is None:
        return 2
    summary.update(action="challenger_set", challenger=version)
    _write_summary(args, summary)
    return 0


def _train_candidate(args: argparse.Namespace, root: Path, signing_key: bytes | None) -> str | None:
    """Trains on the topic with the champion's recipe and sets the result as challenger."""
    from .fit import TrainConfig, train_and_save
    from .topic_cli import _topic_data

    try:
        profile, recipe = champion_recipe(root, signing_key)
    except ArtifactError as exc:
        print(f"trainer: {exc}", file=sys.stderr)
        return None
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    recipe = {k: v for k, v in recipe.items() if k in known}
    recipe.update(seed=args.seed, device=args.device, threads=args.threads)
    if args.epochs:
        recipe["epochs"] = args.epochs
    config = TrainConfig(**recipe)
    if args.since is None and args.until is None and args.lookback_hours > 0:
        args.since = str(time.time() - 3600.0 * args.lookback_hours)
    args.fields = None
    read = _topic_data(args, profile)
    data = read.data
    if not data.events:
        print("trainer: no valid events on the topic in the period to train on", file=sys.stderr)
        return None
    print(f"retraining {config.model} on {len(data.events)} events of {read.describe()['keys']} keys with the champion's "
          f"recipe (window {config.window})", flush=True)
    try:
        path, result = train_and_save(data.events, profile, config, root, labels=data.labels,
                                      progress=not args.no_progress, data_description=read.describe(),
                                      signing_key=signing_key)
    except ValueError as exc:  # e.g. too few windows for the window size
        print(f"trainer: not trained: {exc}", file=sys.stderr)
        return None
    try:
        set_alias(root, CHALLENGER, path.name, check=lambda p: load_artifact(p, signing_key=signing_key))
    except ArtifactError as exc:
        print(f"trainer: the candidate {path.name} does not load, not set as challenger: {exc}", file=sys.stderr)
        return None
    print(f"candidate {path.name} set as {CHALLENGER} (threshold {result.threshold['value']:.6g}); the worker "
          f"shadows it from its next model poll; run `trainer retrain` again after {args.min_shadow_s:.0f} s "
          f"for the gate", flush=True)
    return path.name


def _max_drift(args: argparse.Namespace) -> float | None:
    """The largest ``stream_detector_feature_drift`` over the workers' features (in training standard
    deviations), or None (after saying why) when it cannot be read."""
    from .lifecycle import scrape_metrics

    if not args.metrics_url:
        print("trainer: --min-drift needs --metrics-url (the workers' /metrics pages)", file=sys.stderr)
        return None
    try:
        samples = scrape_metrics(list(args.metrics_url))
    except (OSError, ValueError) as exc:
        print(f"trainer: cannot read the workers' metrics: {exc}", file=sys.stderr)
        return None
    drifts = [abs(v) for (name, _), v in samples.items() if name == "stream_detector_feature_drift"]
    if not drifts:
        print("trainer: the workers' metrics have no stream_detector_feature_drift yet", file=sys.stderr)
        return None
    return max(drifts)


def _write_summary(args: argparse.Namespace, summary: dict[str, object]) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))


def add_lifecycle_commands(sub) -> None:
    from .topic_cli import _topic_flags

    c = sub.add_parser("compare", help="the challenger against the champion on the live traffic since it was set")
    _connection_flags(c)
    c.add_argument("--since", metavar="TIME", help="compare from this time (default: when the challenger was set)")
    _gate_flags(c)
    c.add_argument("--json", metavar="FILE", help="also write the comparison and the gate's decision here")
    c.set_defaults(func=cmd_compare)

    r = sub.add_parser("retrain", help="one step of gated retraining (for cron): train a challenger from the "
                                       "topic, or gate the one shadowing and promote or retire it")
    _topic_flags(r)  # --from-topic, --since, --until, --config, --bootstrap-servers, --alerts-topic, ...
    r.add_argument("--model-dir", default="artifacts/model", help="the model directory the worker serves")
    r.add_argument("--metrics-url", action="append", default=[], metavar="URL",
                   help="a worker's /metrics page (repeatable): adds both models' windows judged to the comparison")
    r.add_argument("--match-slack", type=float, default=0.0, metavar="SECONDS")
    r.add_argument("--signing-key", metavar="PATH", help="HMAC-SHA256 key file to sign the candidate with and "
                                                        "check the champion against")
    r.add_argument("--lookback-hours", type=float, default=24.0,
                   help="without --since/--until: train on the topic's last this many hours")
    r.add_argument("--include-alerted", dest="exclude_alerted", action="store_false",
                   help="keep the events the served model alerted on in training (default: left out)")
    r.add_argument("--no-feedback", dest="with_feedback", action="store_false",
                   help="ignore the feedback topic's verdicts (default: false positives are normal training data)")
    r.add_argument("--min-drift", type=float, default=0.0, metavar="SIGMAS",
                   help="with no challenger set, train a candidate only when a feature's drift "
                        "(stream_detector_feature_drift, read from --metrics-url) reaches this (default 0: always)")
    r.add_argument("--epochs", type=int, default=0, help="training epochs (default: the champion's)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="auto")
    r.add_argument("--threads", type=int, default=0)
    r.add_argument("--no-progress", action="store_true")
    _gate_flags(r)
    r.add_argument("--json", metavar="FILE", help="also write what this run did here")
    r.set_defaults(func=cmd_retrain, exclude_alerted=True, with_feedback=True)
