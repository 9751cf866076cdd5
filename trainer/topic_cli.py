"""`--from-topic` flags of `trainer train`: the input topic's history as training data."""

from __future__ import annotations

import argparse
import sys

from stream_detector.profiles import Profile
from stream_detector.settings import Settings, SettingsError

from .topic import TopicRead, alerted_event_ids, parse_time_flag, read_json_records, read_topic, read_verdicts


def _topic_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from-topic", metavar="TOPIC",
                   help="train on this Kafka topic's history, decoded as the worker decodes it (its envelope "
                        "settings, from STREAM_DETECTOR_* variables or --config); reads up to the end the "
                        "topic had when the read began")
    p.add_argument("--since", metavar="TIME",
                   help="--from-topic: first record time (ISO-8601 or epoch seconds; default: the beginning)")
    p.add_argument("--until", metavar="TIME",
                   help="--from-topic: records before this time (default: the partitions' current end)")
    p.add_argument("--config", metavar="FILE",
                   help="--from-topic: TOML settings file, as for stream-detector (also STREAM_DETECTOR_CONFIG)")
    p.add_argument("--bootstrap-servers", metavar="SERVERS",
                   help="--from-topic: Kafka bootstrap servers (default: the bootstrap_servers setting)")
    p.add_argument("--exclude-alerted", action="store_true",
                   help="--from-topic: label the events the served model alerted on (the event_ids of the alerts "
                        "topic's messages) anomalous, so unsupervised training leaves their windows out")
    p.add_argument("--alerts-topic", metavar="TOPIC",
                   help="--exclude-alerted, --with-feedback: the alerts topic (default: the alerts_topic setting)")
    p.add_argument("--with-feedback", action="store_true",
                   help="--from-topic: apply operators' verdicts from the feedback topic (stream-detector ack): events "
                        "of false_positive incidents are normal training data, those of true_positive ones anomalous")
    p.add_argument("--read-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="--from-topic: give up when the broker sends nothing for this long")


def _topic_data(args: argparse.Namespace, profile: str | Profile) -> TopicRead:
    """Reads ``--from-topic``; exits with a one-line error on bad flags, settings or an unreadable topic."""
    from stream_detector.kafka.security import client_config

    try:
        since = parse_time_flag(args.since) if args.since else None
        until = parse_time_flag(args.until) if args.until else None
        settings = Settings.load(args.config, overrides={"bootstrap_servers": args.bootstrap_servers})
    except (ValueError, SettingsError) as exc:
        raise SystemExit(f"trainer: {exc}") from None
    if args.alerts_topic and not (getattr(args, "exclude_alerted", False) or getattr(args, "with_feedback", False)):
        raise SystemExit("trainer: --alerts-topic needs --exclude-alerted or --with-feedback")
    if since is not None and until is not None and until <= since:
        raise SystemExit("trainer: --until must be after --since")
    fields = [f for f in args.fields.split(",") if f] if getattr(args, "fields", None) else None
    try:
        read = read_topic(settings, args.from_topic, profile, since, until, fields=fields,
                          client_config=client_config(settings, "consumer"), timeout_s=args.read_timeout)
    except (ValueError, TimeoutError) as exc:
        raise SystemExit(f"trainer: --from-topic {args.from_topic}: {exc}") from None
    refused = read.data.rejected
    counts = ", ".join(f"{reason} {n}" for reason, n in sorted(refused.items())) or "none"
    print(f"--from-topic {args.from_topic}: {read.records} records read from {len(read.partitions)} partition(s); "
          f"{sum(refused.values())} refused ({counts}); {len(read.data.events)} events", flush=True, file=sys.stdout)
    if getattr(args, "exclude_alerted", False):
        alerts_topic = args.alerts_topic or settings.alerts_topic
        try:
            ids, messages, unreadable = alerted_event_ids(settings.bootstrap_servers, alerts_topic,
                                                          client_config(settings, "consumer"), args.read_timeout)
        except (ValueError, TimeoutError) as exc:
            raise SystemExit(f"trainer: --alerts-topic {alerts_topic}: {exc}") from None
        read.data.labels = [1 if e.event_id in ids else label for e, label in zip(read.data.events, read.data.labels)]
        read.alerted = sum(read.data.labels)
        print(f"--exclude-alerted: {messages} alert message(s) on {alerts_topic} ({unreadable} without event_ids); "
              f"{read.alerted} events alerted on, their windows left out of training", flush=True)
    if getattr(args, "with_feedback", False):
        _apply_topic_feedback(args, settings, read)
    return read


def _apply_topic_feedback(args: argparse.Namespace, settings: Settings, read: TopicRead) -> None:
    """Relabels the read events from the verdicts on the feedback topic; the incidents' events come
    from the alerts topic. Verdicts win over ``--exclude-alerted``: a false alarm's events are normal."""
    from stream_detector.kafka.security import client_config

    from .feedback import apply_verdicts, unreviewed_events

    feedback_topic = settings.feedback_topic_name
    alerts_topic = args.alerts_topic or settings.alerts_topic
    config = client_config(settings, "consumer")
    try:
        verdicts, invalid = read_verdicts(settings.bootstrap_servers, feedback_topic, config, args.read_timeout)
        alerts = [doc for _, doc in read_json_records(settings.bootstrap_servers, alerts_topic,
                                                      client_config=config, timeout_s=args.read_timeout)[0]]
    except (ValueError, TimeoutError) as exc:
        raise SystemExit(f"trainer: --with-feedback: {exc}") from None
    read.data.labels, relabelled = apply_verdicts([e.event_id for e in read.data.events], read.data.labels,
                                                  verdicts, alerts)
    read.unreviewed = unreviewed_events(alerts, verdicts)
    if read.alerted is not None:
        read.alerted = sum(read.data.labels)  # left out after the verdicts: false alarms are kept
    read.verdicts = {"verdicts": len(verdicts), "invalid_messages": invalid,
                     "true_positive_events": relabelled["true_positive"],
                     "false_positive_events": relabelled["false_positive"]}
    print(f"--with-feedback: {len(verdicts)} verdict(s) on {feedback_topic} ({invalid} invalid message(s)); "
          f"{relabelled['true_positive']} events of true positives left out as anomalous, "
          f"{relabelled['false_positive']} events of false positives kept as normal", flush=True)
