"""``stream-detector``: the worker, the demo producer, an alert reader, a local broker, and the demo."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Sequence

from .settings import ENV_PREFIX, MAPPING_FIELDS, SECRET_FIELDS, Settings, SettingsError, settings_table

log = logging.getLogger("stream_detector")


def version() -> str:
    """The installed distribution's version (the source tree's when not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as distribution_version

    try:
        return distribution_version("stream-detector")
    except PackageNotFoundError:
        return "0+unknown"


class _PropertyAction(argparse.Action):
    """``--kafka-producer compression.type=zstd`` (repeatable): one property of a mapping setting."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: Any,
                 option_string: str | None = None) -> None:
        prop, sep, text = str(value).partition("=")
        if not sep or not prop:
            parser.error(f"{option_string} takes PROPERTY=VALUE, not {value!r}")
        current = dict(getattr(namespace, self.dest) or {})
        current[prop] = text
        setattr(namespace, self.dest, current)


def _add_settings_flags(p: argparse.ArgumentParser) -> None:
    """One flag per setting, generated from the Settings dataclass (its docs are the help)."""
    group = p.add_argument_group(
        "settings", "every setting, as in `stream-detector settings --table`; precedence: defaults < TOML file < "
                    "STREAM_DETECTOR_* environment variables < these flags")
    group.add_argument("--config", metavar="FILE",
                       help="TOML settings file, keys as in `stream-detector settings --table` (also STREAM_DETECTOR_CONFIG)")
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        doc = re.sub(r"`([^`]*)`", r"\1", f.metadata.get("doc", "")).replace("%", "%%")
        if f.name in SECRET_FIELDS:  # a secret on a command line is visible to every user of the machine
            group.add_argument(flag + "-file", dest=f.name + "_file", metavar="FILE", default=None,
                               help=f"file holding {f.name} ({ENV_PREFIX}{f.name.upper()}_FILE)")
        elif f.name in MAPPING_FIELDS:
            group.add_argument(flag, dest=f.name, action=_PropertyAction, metavar="PROPERTY=VALUE", default=None,
                               help=f"{doc} Repeatable ({ENV_PREFIX}{f.name.upper()}__<PROPERTY>).")
        elif isinstance(f.default, bool):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=f"{doc} ({ENV_PREFIX}{f.name.upper()}; default {str(f.default).lower()})")
        else:
            group.add_argument(flag, dest=f.name, metavar=f.name.rsplit("_", 1)[-1].upper(), default=None,
                               help=f"{doc} ({ENV_PREFIX}{f.name.upper()}; default {f.default!r})")


def _settings(args: argparse.Namespace) -> Settings:
    names = [f.name for f in dataclasses.fields(Settings) if f.name not in SECRET_FIELDS]
    names += [name + "_file" for name in SECRET_FIELDS]
    return Settings.load(args.config, overrides={n: getattr(args, n, None) for n in names})


def _configure_logging(level: str, json_logs: bool = False) -> None:
    """Text lines, or one JSON object per line (``log_json``); the worker's Faust logs go the same way."""
    from .logs import setup_logging

    setup_logging(level, json_logs=json_logs)


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _configure_logging(settings.log_level, settings.log_json)
    from .artifacts import ArtifactError
    from .errors import UnsupportedDependency
    from .worker import run_worker

    log.info("settings: %s", settings.redacted())
    try:
        run_worker(settings)
    except ArtifactError as exc:  # no servable model (champion refused, none trained, bad key): say why
        log.error("cannot start: %s", exc)
        return 2
    except UnsupportedDependency as exc:  # an untested faust-streaming or mode-streaming
        log.error("cannot start: %s", exc)
        return 2
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    from .kafka.security import client_config
    from .producer import produce_events
    from .synthetic import generate

    settings = _settings(args)
    topic = args.topic or settings.input_topic
    events = generate(args.profile, args.keys, args.events_per_key, args.anomaly_rate, seed=args.seed)
    print(f"producing {len(events)} {args.profile} events ({sum(e.label for e in events)} injected anomalies) "
          f"to {topic} at {settings.bootstrap_servers}, {args.rate or 'max'} events/s", flush=True)
    n = produce_events(settings.bootstrap_servers, topic, events, rate=args.rate,
                       on_progress=lambda i: print(f"  {i} events sent", flush=True),
                       extra_config=client_config(settings, "producer"))
    print(f"{n} events acknowledged by the broker")
    return 0


def cmd_alerts(args: argparse.Namespace) -> int:
    from .kafka.security import client_config
    from .producer import iter_messages

    settings = _settings(args)
    shown = 0
    for alert in iter_messages(settings.bootstrap_servers, args.topic or settings.alerts_topic,
                               from_beginning=args.from_beginning, idle_timeout=args.idle_timeout,
                               extra_config=client_config(settings, "consumer")):
        print(format_alert(alert), flush=True)
        shown += 1
        if args.max and shown >= args.max:
            break
    return 0


def cmd_ack(args: argparse.Namespace) -> int:
    """Publishes one verdict on an incident to the feedback topic (created compacted if missing)."""
    from .feedback import Feedback, InvalidFeedback
    from .kafka.admin import ensure_topics
    from .kafka.security import client_config
    from .producer import find_incident_key, publish_message

    settings = _settings(args)
    key = args.key
    if not key:
        key = find_incident_key(settings.bootstrap_servers, settings.alerts_topic, args.incident_id,
                                extra_config=client_config(settings, "consumer"), idle_timeout=args.search_timeout)
        if key is None:
            print(f"stream-detector: error: incident {args.incident_id} not found on {settings.alerts_topic}; "
                  "give its key with --key", file=sys.stderr)
            return 2
    try:
        feedback = Feedback.new(args.incident_id, key, args.verdict, by=args.by, note=args.note)
    except InvalidFeedback as exc:
        print(f"stream-detector: error: {exc}", file=sys.stderr)
        return 2
    topic = settings.feedback_topic_name
    ensure_topics(settings.bootstrap_servers, {topic: 1}, client_config=client_config(settings, "admin"),
                  replication_factor=settings.topic_replication_factor,
                  topic_configs={topic: {"cleanup.policy": "compact"}})
    record_key, value = feedback.encode()
    publish_message(settings.bootstrap_servers, topic, record_key, value,
                    extra_config=client_config(settings, "producer"))
    print(f"{feedback.verdict} for incident {feedback.incident_id} (key {feedback.key}) published to {topic}")
    return 0


def format_alert(alert: dict, labels: dict[str, int] | None = None) -> str:
    """One line per alert message; with the demo's labels, how many of its events were injected."""
    top = ", ".join(f"{f['feature']}={f['error']:.1f}" for f in alert.get("top_features", []))
    ids = alert.get("event_ids") or [alert["event_id"]]
    verdict = ""
    if labels is not None and ids:
        injected = sum(1 for i in ids if labels.get(i))
        verdict = f"  [{injected} of {len(ids)} events injected anomalies]"
    state = alert.get("state", "alert").upper()
    return (f"{state:6s} key={alert['key']} event={alert['event_id']} score={alert['score']:.2f} "
            f"(threshold {alert['threshold']:.2f}) events={len(ids)} top: {top}{verdict}")


def cmd_broker(args: argparse.Namespace) -> int:
    from .kafka import local_broker

    if not local_broker.FETCH_SCRIPT.is_file() and not local_broker.DEFAULT_KAFKA_HOME.is_dir():
        print("stream-detector: error: `stream-detector broker` is a development tool: it needs a source checkout "
              "(deploy/kafka/fetch-kafka.sh fetches Apache Kafka with Maven; Java 17 and Maven required). "
              "From an installed package use your own Kafka, or the compose stack that "
              "`stream-detector deploy-files --out DIR` writes (its `kafka` service).", file=sys.stderr)
        return 2
    return local_broker.main(args.rest)


# What `deploy-files` writes, under --out: (file in the package's deploy data, path written).
DEPLOY_FILES = (
    ("docker-compose.yml", "docker-compose.yml"),
    ("Dockerfile", "deploy/Dockerfile"),
    ("Dockerfile.dockerignore", "deploy/Dockerfile.dockerignore"),
    ("prometheus/prometheus.yml", "deploy/prometheus/prometheus.yml"),
    ("prometheus/rules.yml", "deploy/prometheus/rules.yml"),
    ("prometheus/rules.test.yml", "deploy/prometheus/rules.test.yml"),
    ("prometheus/kafka_exporter.rules.yml", "deploy/prometheus/kafka_exporter.rules.yml"),
    ("prometheus/kafka_exporter.rules.test.yml", "deploy/prometheus/kafka_exporter.rules.test.yml"),
    ("alertmanager/alertmanager.yml", "deploy/alertmanager/alertmanager.yml"),
    ("grafana/dashboards/stream-detector.json", "deploy/grafana/dashboards/stream-detector.json"),
    ("grafana/provisioning/dashboards/dashboards.yml", "deploy/grafana/provisioning/dashboards/dashboards.yml"),
    ("grafana/provisioning/datasources/prometheus.yml", "deploy/grafana/provisioning/datasources/prometheus.yml"),
    ("runbook.md", "docs/runbook.md"),
)


def deploy_data(name: str) -> str:
    """A shipped deployment file: package data when installed, the checkout's deploy/ otherwise."""
    from importlib import resources

    try:
        return resources.files("stream_detector.deploy").joinpath(name).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        return (Path(__file__).resolve().parent.parent / "deploy" / name).read_text(encoding="utf-8")


def cmd_deploy_files(args: argparse.Namespace) -> int:
    """Writes the compose stack, Prometheus and Alertmanager configs, rules, dashboard and runbook."""
    out = Path(args.out)
    written = []
    for name, target in DEPLOY_FILES:
        text = deploy_data(name)
        if args.job != "stream-detector" and (name.startswith("prometheus/")):
            text = (text.replace('job="stream-detector"', f'job="{args.job}"')
                    .replace("job: stream-detector", f"job: {args.job}")
                    .replace("job_name: stream-detector", f"job_name: {args.job}")
                    .replace('"job", "stream-detector"', f'"job", "{args.job}"'))
        if args.runbook_url_base and name.startswith("prometheus/rules"):
            text = text.replace('"docs/runbook.md#', f'"{args.runbook_url_base.rstrip("/")}#')
        path = out / target
        if path.exists() and not args.force:
            print(f"stream-detector: error: {path} exists (--force overwrites)", file=sys.stderr)
            return 2
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(str(path))
    print("\n".join(written))
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    if args.table:
        print(settings_table())
    else:
        import json

        print(json.dumps(_settings(args).redacted(), indent=2))
    return 0


def _wait_http(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"worker exited with code {process.returncode} during startup")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _any_free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cmd_demo(args: argparse.Namespace) -> int:
    """Local broker, a model (trained on generated data if none), the worker, demo events, alerts."""
    import tempfile

    from .artifacts import ArtifactError
    from .registry import load_served
    from .kafka.local_broker import LocalBroker, ensure_topics
    from .producer import iter_messages, produce_events
    from .synthetic import generate

    model_dir = Path(args.model_dir or f"artifacts/demo-{args.profile}")
    try:
        version = load_served(model_dir).path
        print(f"[demo] using model {version}", flush=True)
    except ArtifactError as exc:
        print(f"[demo] no loadable model in {model_dir} ({exc}): training one on generated normal "
              f"{args.profile} data", flush=True)
        from trainer.cli import main as trainer_main

        code = trainer_main(["train", "--profile", args.profile, "--synthetic", "--out", str(model_dir),
                             "--epochs", str(args.train_epochs), "--promote"])
        if code:
            return code

    data_dir = Path(tempfile.mkdtemp(prefix="stream-detector-demo-"))
    port = args.broker_port if _port_free(args.broker_port) else None  # None: any free port
    broker = LocalBroker(data_dir=data_dir / "kafka", port=port)
    print("[demo] starting a local Kafka broker (first run fetches Apache Kafka 3.9.1 from Maven Central)",
          flush=True)
    broker.start(timeout=180)
    bootstrap = broker.bootstrap_servers
    topics = {"events": 4, "alerts": 1, "events.dlq": 1}
    ensure_topics(bootstrap, topics)
    print(f"[demo] broker at {bootstrap}; topics: {', '.join(topics)}", flush=True)
    print(f"[demo] read alerts with any Kafka client too, e.g.: kcat -b {bootstrap} -t alerts -C", flush=True)

    metrics_port = args.metrics_port if _port_free(args.metrics_port) else _any_free_port()
    env = dict(os.environ,
               STREAM_DETECTOR_BOOTSTRAP_SERVERS=bootstrap,
               STREAM_DETECTOR_MODEL_DIR=str(model_dir),
               STREAM_DETECTOR_METRICS_PORT=str(metrics_port),
               STREAM_DETECTOR_LOG_LEVEL="warning")
    worker = subprocess.Popen([sys.executable, "-m", "stream_detector", "worker"], env=env)
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        _wait_http(metrics_url, 120, worker)
        print(f"[demo] worker up; metrics at {metrics_url}", flush=True)
        events = generate(args.profile, args.keys, args.events_per_key, args.anomaly_rate, seed=args.seed)
        labels = {e.event_id: e.label for e in events}
        injected = sum(labels.values())
        print(f"[demo] producing {len(events)} events from {args.keys} keys at {args.rate} events/s, "
              f"{injected} injected anomalies; alerts follow as they arrive:", flush=True)
        producer = threading.Thread(target=produce_events, args=(bootstrap, "events", events, args.rate), daemon=True)
        producer.start()
        started = time.monotonic()
        alerts = {}

        def done() -> bool:
            """Checked after each alert and whenever the alerts topic is quiet: had it been checked
            only on alerts, a stream whose last alert came before its last event waited forever."""
            if worker.poll() is not None:
                raise RuntimeError(f"worker exited with code {worker.returncode}")
            return bool((not producer.is_alive() and time.monotonic() - started > 5)
                        or (args.max_seconds and time.monotonic() - started > args.max_seconds))

        for alert in iter_messages(bootstrap, "alerts", stop=done):
            alerts[alert["alert_id"]] = alert
            print(format_alert(alert, labels), flush=True)
            if done():
                break
        # Drain what is still in flight.
        for alert in iter_messages(bootstrap, "alerts", idle_timeout=5.0):
            if alert["alert_id"] not in alerts:
                alerts[alert["alert_id"]] = alert
                print(format_alert(alert, labels), flush=True)
        reported = {i for a in alerts.values() for i in (a.get("event_ids") or [a["event_id"]])}
        caught = sum(1 for i in reported if labels.get(i))
        false = sum(1 for i in reported if not labels.get(i))
        incidents = len({a.get("incident_id", a["alert_id"]) for a in alerts.values()})
        print(f"[demo] {len(alerts)} alert messages in {incidents} incidents: {caught} of {injected} "
              f"anomalous events reported, {false} normal events reported (false alarms)", flush=True)
        print(f"[demo] metrics: {metrics_url}", flush=True)
        if args.keep_running:
            print("[demo] still running; Ctrl-C to stop", flush=True)
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        broker.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stream-detector", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Streaming anomaly detection for Kafka: the worker, a demo producer, an alert reader,\n"
                    "a local broker and a one-command demo.",
        epilog="settings: defaults < TOML file (--config or STREAM_DETECTOR_CONFIG) < STREAM_DETECTOR_* environment\n"
               "variables < flags. `stream-detector settings --table` lists every setting and its variable;\n"
               "STREAM_DETECTOR_LOG_JSON=true logs one JSON object per line. Models come from `trainer train`.\n\n"
               "examples:\n"
               "  stream-detector demo\n"
               "  STREAM_DETECTOR_BOOTSTRAP_SERVERS=broker:9092 stream-detector worker --model-dir artifacts/model\n"
               "  stream-detector produce --bootstrap-servers broker:9092 --rate 500\n"
               "  stream-detector alerts --bootstrap-servers broker:9092")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        # No abbreviated flags: a mistyped one must not silently set another setting.
        return sub.add_parser(name, allow_abbrev=False, **kwargs)


    p = command(
        "worker", help="run the detector worker (Faust) until SIGINT/SIGTERM",
        description="Consume events, score per-key windows with the model, publish alerts and dead letters, and "
                    "serve Prometheus metrics (consumer lag included). Every setting comes from a TOML file, a "
                    "STREAM_DETECTOR_* environment variable or its flag below.")
    _add_settings_flags(p)
    p.set_defaults(func=cmd_worker)

    p = command("produce", help="publish labelled synthetic events with injected anomalies",
                       description="Publish generated events (normal behaviour per key, with injected anomalies "
                                   "labelled in the `label` field) to a topic, keyed by event key.")
    p.add_argument("--topic", default=None, help="topic to publish to (default: the input_topic setting)")
    p.add_argument("--profile", choices=["sensors", "transactions"], default="sensors")
    p.add_argument("--keys", type=int, default=20, help="distinct keys (devices, customers)")
    p.add_argument("--events-per-key", type=int, default=500)
    p.add_argument("--anomaly-rate", type=float, default=0.02, help="share of events with an injected anomaly")
    p.add_argument("--rate", type=float, default=1000.0, help="events per second; 0 = as fast as possible")
    p.add_argument("--seed", type=int, default=1)
    _add_settings_flags(p)
    p.set_defaults(func=cmd_produce)

    p = command("alerts", help="print alerts from the alerts topic as they arrive",
                       description="Print alerts (one line each: key, event, score against threshold, top features).")
    p.add_argument("--topic", default=None, help="topic to read (default: the alerts_topic setting)")
    p.add_argument("--from-beginning", action="store_true")
    p.add_argument("--max", type=int, default=0, help="stop after this many alerts")
    p.add_argument("--idle-timeout", type=float, default=None, help="stop after this many quiet seconds")
    _add_settings_flags(p)
    p.set_defaults(func=cmd_alerts)

    p = command("ack", help="give a verdict on an incident (feedback topic)",
                description="Publish an operator's verdict on an incident to the compacted feedback topic, keyed by "
                            "the incident id: true_positive, false_positive (a false alarm: normal training data "
                            "for the next model) or expected_change (the worker closes the incident, reason "
                            "acknowledged, and restarts the key's threshold warm-up).")
    p.add_argument("incident_id", metavar="INCIDENT_ID", help="the incident_id of the incident's alert messages")
    p.add_argument("--verdict", required=True, choices=["true_positive", "false_positive", "expected_change"])
    p.add_argument("--key", default=None,
                   help="the incident's key (default: looked up in the alerts topic, read from the beginning)")
    p.add_argument("--by", default=None, help="who gives the verdict")
    p.add_argument("--note", default=None, help="free text kept with the verdict")
    p.add_argument("--search-timeout", type=float, default=5.0,
                   help="without --key: stop reading the alerts topic after this many quiet seconds")
    _add_settings_flags(p)
    p.set_defaults(func=cmd_ack)

    p = command("demo", help="broker + model + worker + demo events, alerts printed as they arrive",
                       description="Start a local Kafka broker, train a model on generated data if none exists, "
                                   "run the worker, stream labelled demo events and print each alert as injected "
                                   "anomaly or false alarm, then a summary.")
    p.add_argument("--profile", choices=["sensors", "transactions"], default="sensors")
    p.add_argument("--model-dir", help="model to serve (default: artifacts/demo-<profile>, trained if missing)")
    p.add_argument("--keys", type=int, default=20)
    p.add_argument("--events-per-key", type=int, default=3000, help="20 keys x 3000 at 500/s: two minutes")
    p.add_argument("--anomaly-rate", type=float, default=0.02)
    p.add_argument("--rate", type=float, default=500.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--metrics-port", type=int, default=9108)
    p.add_argument("--broker-port", type=int, default=9092, help="used when free, else any free port")
    p.add_argument("--train-epochs", type=int, default=40)
    p.add_argument("--max-seconds", type=float, default=0)
    p.add_argument("--keep-running", action="store_true", help="keep broker and worker up after the demo events")
    p.set_defaults(func=cmd_demo)

    p = command("broker", help="run a local single-node Kafka broker in the foreground",
                       description="Run a local single-node KRaft broker (Apache Kafka jars fetched into .cache/); "
                                   "`stream-detector broker --help` lists its own options.")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of stream_detector.kafka.local_broker")
    p.set_defaults(func=cmd_broker)

    p = command("deploy-files", help="write the compose stack, Prometheus/Alertmanager configs, rules, dashboard "
                                     "and runbook",
                description="Write the deployment files shipped with the package (docker-compose.yml and deploy/: "
                            "Dockerfile, Prometheus config and alert rules with their tests, Alertmanager config, "
                            "Grafana dashboard and provisioning; docs/runbook.md) under --out.")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write into")
    p.add_argument("--job", default="stream-detector",
                   help="the Prometheus scrape job name the rules select (default stream-detector)")
    p.add_argument("--runbook-url-base", default="", metavar="URL",
                   help="where docs/runbook.md is served: the rules' runbook_url become URL#<alert>")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=cmd_deploy_files)

    p = command("settings", help="print the effective settings (secrets masked) or the settings table",
                       description="Print the effective settings as JSON (defaults, file, environment and flags "
                                   "applied; secrets masked), or with --table every setting with its environment "
                                   "variable, default and meaning.")
    _add_settings_flags(p)
    p.add_argument("--table", action="store_true", help="markdown table of every setting")
    p.set_defaults(func=cmd_settings)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["broker"]:  # its options belong to the broker's own parser
        return cmd_broker(argparse.Namespace(rest=argv[1:]))
    args = build_parser().parse_args(argv)
    from .producer import BrokerUnreachable

    try:
        return int(args.func(args) or 0)
    except SettingsError as exc:  # one line naming the setting and its source, no traceback
        print(f"stream-detector: error: {exc}", file=sys.stderr)
        return 2
    except BrokerUnreachable as exc:
        print(f"stream-detector: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
