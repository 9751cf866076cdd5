"""Operations as code: the Grafana dashboard, the Prometheus config and alert rules, the compose file,
the consumer lag gauges and JSON logs, checked with the real tools.

The live test starts a real Prometheus (Debian's ``prometheus`` package; ``deploy/bootstrap.sh``
installs it) on loopback with the shipped ``prometheus.yml`` (target and intervals rewritten) and the
shipped ``rules.yml`` (as is), scraping the real worker during a short demo stream, then evaluates
every PromQL expression of every dashboard panel and every alert rule through Prometheus' HTTP API.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Iterator

import orjson
import pytest
from confluent_kafka import Producer

from stream_detector.kafka.local_broker import ensure_topics
from stream_detector.lag import ConsumerLagMonitor
from stream_detector.logs import JsonFormatter, setup_logging
from stream_detector.metrics import WorkerMetrics
from stream_detector.producer import produce_events
from stream_detector.synthetic import generate

from worker_harness import WorkerProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((ROOT / "deploy/grafana/dashboards").glob("*.json"))
PROMETHEUS_DIR = ROOT / "deploy/prometheus"
COMPOSE_FILE = ROOT / "docker-compose.yml"

# Grafana's built-in and dashboard variables, as Grafana would expand them for a short time range.
# $__rate_interval is max(4 x scrape interval, step + scrape interval): 30s covers >= 4 scrapes at 1s.
GRAFANA_VARIABLES = {
    "$__rate_interval": "30s", "${__rate_interval}": "30s",
    "$__interval": "5s", "${__interval}": "5s",
    "$__range": "2m", "${__range}": "2m",
    "$instance": ".*", "${instance}": ".*", "${instance:regex}": ".*",
}
BOOTSTRAP_HINT = "run `bash deploy/bootstrap.sh` as root (it installs Debian's prometheus and docker-compose)"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"`{name}` is not installed and could not be installed here; {BOOTSTRAP_HINT}")
    return path


def _run(cmd: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


# -- shipped files -----------------------------------------------------------------------------


def _dashboards() -> list[dict[str, Any]]:
    assert DASHBOARDS, "no dashboard JSON under deploy/grafana/dashboards"
    return [json.loads(path.read_text()) for path in DASHBOARDS]


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep their panels inside


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(dashboard title, panel title / refId, expression with Grafana variables expanded)."""
    out = []
    for dashboard in _dashboards():
        for panel in _panels(dashboard):
            for target in panel.get("targets", []):
                expr = target["expr"]
                for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
                    expr = expr.replace(name, GRAFANA_VARIABLES[name])
                assert "$" not in expr, f"unexpanded variable in {panel['title']}: {expr}"
                out.append((dashboard["title"], f"{panel['title']} / {target['refId']}", expr))
    return out


def annotation_exprs() -> list[tuple[str, str]]:
    """(annotation name, expression with Grafana variables expanded) of the dashboards' Prometheus annotations."""
    out = []
    for dashboard in _dashboards():
        for annotation in dashboard.get("annotations", {}).get("list", []):
            if "expr" in annotation:
                expr = annotation["expr"]
                for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
                    expr = expr.replace(name, GRAFANA_VARIABLES[name])
                assert "$" not in expr, f"unexpanded variable in annotation {annotation['name']}: {expr}"
                out.append((annotation["name"], expr))
    return out


def rule_exprs() -> list[tuple[str, str]]:
    """(alert name, expression) from rules.yml, read without a YAML library (the file keeps one
    style: ``- alert: Name`` then ``expr:`` inline or as a ``|`` block)."""
    lines = (PROMETHEUS_DIR / "rules.yml").read_text().splitlines()
    out, name, i = [], None, 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"\s*- (?:alert|record): (\S+)", line)
        if m:
            name = m.group(1)
        m = re.match(r"(\s*)expr: (.*)$", line)
        if m:
            indent, value = len(m.group(1)), m.group(2).strip()
            if value in ("|", ">", "|-", ">-"):
                block = []
                i += 1
                while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                    block.append(lines[i].strip())
                    i += 1
                value = " ".join(b for b in block if b)
                i -= 1
            out.append((name, value))
        i += 1
    return out


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(stream_detector_[a-z_]+)", expr))


def _exposed_names() -> set[str]:
    names = set()
    for family in WorkerMetrics().registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names | {"stream_detector_model_info"}  # an Info has no sample until it is set


def test_dashboard_covers_the_product_and_references_only_real_metrics():
    for dashboard in _dashboards():
        assert dashboard["uid"] and dashboard["title"]
        titles = [p["title"].lower() for p in _panels(dashboard)]
        for wanted in ("events/s", "alerts/s", "invalid and dead-lettered", "consumer lag per partition",
                       "micro-batch size", "inference latency", "event-to-alert latency", "score distribution",
                       "scores against the threshold", "active keys", "evictions", "model version"):
            assert any(wanted in t for t in titles), f"no panel about {wanted!r} in {dashboard['title']}"
        ids = [p["id"] for p in _panels(dashboard)]
        assert len(ids) == len(set(ids)), "duplicate panel ids"
        for panel in _panels(dashboard):
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
                assert panel.get("targets"), f"panel {panel['title']} has no query"
    exposed = _exposed_names()
    for _, panel, expr in dashboard_targets():
        unknown = _metric_names(expr) - exposed
        assert not unknown, f"{panel}: {sorted(unknown)} not exposed by the worker"
    for name, expr in rule_exprs():
        unknown = _metric_names(expr) - exposed
        assert not unknown, f"rule {name}: {sorted(unknown)} not exposed by the worker"


def test_alert_rules_cover_the_operational_failures():
    names = {name for name, _ in rule_exprs()}
    assert len(rule_exprs()) == (PROMETHEUS_DIR / "rules.yml").read_text().count("expr:")
    for wanted in ("StreamDetectorDown", "StreamDetectorConsumerLagGrowing", "StreamDetectorInferenceLatencyHigh",
                   "StreamDetectorDeadLetterRateHigh", "StreamDetectorNoEvents", "StreamDetectorAnomalyIncidentOpen"):
        assert wanted in names


def test_every_rule_links_its_runbook_section_and_selects_the_job():
    text = (PROMETHEUS_DIR / "rules.yml").read_text()
    runbook = (ROOT / "docs/runbook.md").read_text()
    sections = {line[3:].strip().lower() for line in runbook.splitlines() if line.startswith("## ")}
    links = dict(re.findall(r'- alert: (\S+)\n(?:.*\n)*?\s+runbook_url: "docs/runbook.md#([a-z]+)"', text))
    for name, expr in rule_exprs():
        assert links.get(name) == name.lower(), f"{name} has no runbook_url to its own section"
        assert name.lower() in sections, f"docs/runbook.md has no section {name}"
        selectors = re.findall(r"\b(?:stream_detector_[a-z_]+|up)(\{[^}]*\})?", expr)
        assert selectors and all('job="stream-detector"' in sel for sel in selectors), f"{name}: {expr}"


def test_dashboard_marks_incidents_with_annotations_of_real_metrics():
    annotations = annotation_exprs()
    assert {name for name, _ in annotations} >= {"Incidents opened", "Incidents closed"}
    for name, expr in annotations:
        assert "stream_detector_alert_messages_total" in expr, name
        assert not _metric_names(expr) - _exposed_names(), name


def test_prometheus_sends_alerts_to_the_alertmanager_of_the_stack():
    config = (PROMETHEUS_DIR / "prometheus.yml").read_text()
    assert re.search(r"^alerting:\n  alertmanagers:\n(?:.*\n)*?.*targets: \[\"alertmanager:9093\"\]", config, re.M)
    compose = COMPOSE_FILE.read_text()
    assert "./deploy/alertmanager/alertmanager.yml:/etc/alertmanager/alertmanager.yml:ro" in compose


def test_amtool_accepts_the_alertmanager_config_and_routes_anomalies_apart():
    amtool = _tool("amtool")
    config = ROOT / "deploy/alertmanager/alertmanager.yml"
    result = _run([amtool, "check-config", str(config)], ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    for labels, receiver in ((["alertname=StreamDetectorAnomalyIncidentOpen", "kind=anomaly"], "anomalies"),
                             (["alertname=StreamDetectorDown", "severity=critical"], "operators")):
        result = _run([amtool, "config", "routes", "test", "--config.file", str(config), *labels], ROOT)
        assert result.returncode == 0 and result.stdout.strip() == receiver, result.stdout + result.stderr


def test_promtool_checks_the_kafka_exporter_lag_rules():
    promtool = _tool("promtool")
    result = _run([promtool, "check", "rules", "kafka_exporter.rules.yml"], PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    result = _run([promtool, "test", "rules", "kafka_exporter.rules.test.yml"], PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_config_and_rules_and_the_rule_unit_tests_pass():
    promtool = _tool("promtool")
    result = _run([promtool, "check", "config", "prometheus.yml"], PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr  # rules.yml resolved next to the config
    result = _run([promtool, "check", "rules", "rules.yml"], PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rule_exprs())} rules found" in result.stdout
    result = _run([promtool, "test", "rules", "rules.test.yml"], PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_docker_compose_file_is_valid_and_complete():
    compose = _tool("docker-compose")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    result = subprocess.run([compose, "-f", str(COMPOSE_FILE), "config", "-q"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    result = subprocess.run([compose, "-f", str(COMPOSE_FILE), "config", "--services"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    services = set(result.stdout.split())
    assert {"kafka", "topics", "model", "worker", "producer", "prometheus", "alertmanager", "grafana"} <= services
    text = COMPOSE_FILE.read_text()
    for source in re.findall(r"- \./([\w./-]+):", text):  # bind-mounted files and folders of the repo
        if not source.startswith("artifacts"):
            assert (ROOT / source).exists(), f"docker-compose.yml mounts missing {source}"
    assert (ROOT / "deploy/Dockerfile").is_file()


# -- JSON logs and the lag monitor without a broker ----------------------------------------------


def test_json_formatter_writes_one_object_per_line():
    formatter = JsonFormatter()
    logger = logging.getLogger("stream_detector.test")
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record = logger.makeRecord(logger.name, logging.ERROR, __file__, 1, "failed on %s\nsecond line",
                                   ("k-1",), sys.exc_info(), extra={"partition": 3})
    line = formatter.format(record)
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["level"] == "error" and obj["logger"] == "stream_detector.test"
    assert obj["message"] == "failed on k-1\nsecond line"
    assert obj["exc_type"] == "ValueError" and obj["exc"].startswith("Traceback") and "bad" in obj["exc"]
    assert obj["partition"] == 3
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", obj["ts"])


def test_lag_monitor_survives_an_unreachable_broker():
    metrics = WorkerMetrics()
    monitor = ConsumerLagMonitor(f"127.0.0.1:{free_port()}", "g", "events", metrics, interval_s=0.1,
                                 timeout_s=0.3)
    monitor.start()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and metrics.consumer_lag_errors._value.get() < 2:
        time.sleep(0.1)
    monitor.stop()
    assert metrics.consumer_lag_errors._value.get() >= 2  # retried, never raised


# -- the live stack: broker, worker, Prometheus ---------------------------------------------------


class PrometheusServer:
    """A real Prometheus on 127.0.0.1 with the shipped config (target and intervals rewritten for the
    test) and the shipped rules file copied as is."""

    def __init__(self, binary: str, workdir: Path, worker_target: str):
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.worker_target = worker_target
        self.process: subprocess.Popen | None = None
        self.log_path = workdir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self) -> Path:
        text = (PROMETHEUS_DIR / "prometheus.yml").read_text()
        text, n = re.subn(r"(?m)^(\s*(?:scrape_interval|evaluation_interval|scrape_timeout)):\s*\S+", r"\1: 1s", text)
        assert n >= 2, "prometheus.yml: no global scrape/evaluation interval to shorten"
        assert '"worker:9108"' in text, "prometheus.yml no longer scrapes worker:9108"
        text = text.replace('"worker:9108"', f'"{self.worker_target}"')
        text = text.replace('"localhost:9090"', f'"127.0.0.1:{self.port}"')
        config = self.workdir / "prometheus.yml"
        config.write_text(text)
        shutil.copy(PROMETHEUS_DIR / "rules.yml", self.workdir / "rules.yml")
        return config

    def start(self, timeout: float = 30) -> "PrometheusServer":
        config = self.write_config()
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [self.binary, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h",
             "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"prometheus not ready after {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no log>"

    def api(self, path: str, **params: str) -> dict[str, Any]:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:  # 400/422: the body says why (e.g. a parse error)
            return json.loads(exc.read() or b"{}") | {"http_status": exc.code}

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("query", query=expr)

    def scalar(self, expr: str) -> float:
        result = self.query(expr)
        assert result.get("status") == "success", (expr, result)
        values = result["data"]["result"]
        return float(values[0]["value"][1]) if values else float("nan")


@pytest.fixture
def prometheus_binary() -> str:
    return _tool("prometheus")


def _produce_with_invalid(bootstrap: str, topic: str, n_invalid: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(n_invalid):
        producer.produce(topic, key=f"bad-{i}".encode(), value=b"{not json" if i % 2 else b"[1, 2]")
    producer.flush(30)


@pytest.mark.integration
def test_prometheus_scrapes_the_worker_and_every_dashboard_and_rule_query_works(
        kafka_broker, sensor_model_dir, tmp_path, prometheus_binary):
    bootstrap = kafka_broker.bootstrap_servers
    worker = WorkerProcess(bootstrap, sensor_model_dir, tmp_path / "worker.log",
                           extra_env={"STREAM_DETECTOR_LAG_INTERVAL_S": "0.5", "STREAM_DETECTOR_LOG_JSON": "true",
                                      "STREAM_DETECTOR_BATCH_MAX": "256"})
    ensure_topics(bootstrap, {worker.input_topic: 2, worker.alerts_topic: 1, worker.dead_letter_topic: 1})
    prom = PrometheusServer(prometheus_binary, tmp_path, f"127.0.0.1:{worker.metrics_port}")
    started = time.monotonic()
    worker.start()
    try:
        prom.start()
        # A short demo stream: 3,000 events over ~12 s with injected anomalies, invalid messages mixed in.
        events = generate("sensors", 10, 300, anomaly_rate=0.03, seed=11)
        n_invalid = 40
        _produce_with_invalid(bootstrap, worker.input_topic, n_invalid // 2)
        produce_events(bootstrap, worker.input_topic, events, rate=250)
        _produce_with_invalid(bootstrap, worker.input_topic, n_invalid - n_invalid // 2)
        total = len(events) + n_invalid
        worker.wait_for_metric("stream_detector_events_consumed_total", total, timeout=90)
        worker.wait_for_metric("stream_detector_events_dead_lettered_total", n_invalid, timeout=30)

        # The lag gauges: per partition, back to 0 once the worker has committed everything.
        deadline = time.monotonic() + 30
        while True:
            m = worker.metrics()
            lags = {k: v for k, v in m.items() if k.startswith("stream_detector_consumer_lag{")}
            highs = sum(v for k, v in m.items() if k.startswith("stream_detector_consumer_high_watermark{"))
            if len(lags) == 2 and sum(lags.values()) == 0 and highs == total:
                break
            assert time.monotonic() < deadline, f"lag never settled: {lags}, high watermarks {highs}\n" \
                                                f"{worker.log_tail()}"
            time.sleep(0.5)

        # Prometheus has the final values, and enough samples inside the 30 s rate window.
        deadline = time.monotonic() + 30
        while prom.scalar("sum(stream_detector_events_consumed_total)") != total or \
                prom.scalar("min(count_over_time(stream_detector_events_consumed_total[30s]))") < 10:
            assert time.monotonic() < deadline, f"Prometheus did not scrape the worker:\n{prom.log_tail()}"
            time.sleep(0.5)
        print(f"\n[operations] stream consumed and scraped {time.monotonic() - started:.1f}s after worker start")

        # Every expression of every dashboard panel parses and returns data.
        targets = dashboard_targets()
        assert len(targets) >= 20
        empty, failed, not_numbers = [], [], []
        for _, panel, expr in targets:
            result = prom.query(expr)
            if result.get("status") != "success":
                failed.append(f"{panel}: {expr}\n    {result.get('errorType')}: {result.get('error')}")
            elif not result["data"]["result"]:
                empty.append(f"{panel}: {expr}")
            elif "histogram_quantile" not in expr and " / " not in expr:  # quantiles and ratios may be NaN
                values = [float(r["value"][1]) for r in result["data"]["result"]]
                if not all(math.isfinite(v) for v in values):
                    not_numbers.append(f"{panel}: {expr} = {values}")
        assert not failed, "dashboard queries Prometheus rejects:\n" + "\n".join(failed)
        assert not empty, "dashboard panels without data:\n" + "\n".join(empty)
        assert not not_numbers, "dashboard panels with NaN or infinite values:\n" + "\n".join(not_numbers)

        # The panels show what happened, not just something.
        assert prom.scalar("sum(rate(stream_detector_events_consumed_total[30s]))") > 0
        assert prom.scalar("sum(rate(stream_detector_events_dead_lettered_total[30s]))") > 0
        assert prom.scalar("sum(stream_detector_alerts_published_total)") > 0
        lag_panel = prom.query('max by (topic, partition) (stream_detector_consumer_lag{instance=~".*"})')
        assert {r["metric"]["partition"] for r in lag_panel["data"]["result"]} == {"0", "1"}
        assert all(r["metric"]["topic"] == worker.input_topic for r in lag_panel["data"]["result"])
        model = prom.query("stream_detector_model_info")["data"]["result"]
        assert model and model[0]["metric"]["profile"] == "sensors" and model[0]["metric"]["version"]
        # The dashboard's $instance variable: label_values(stream_detector_model_info, instance).
        values = prom.api("label/instance/values", **{"match[]": "stream_detector_model_info"})
        assert values["data"] == [f"127.0.0.1:{worker.metrics_port}"]

        # The dashboard's incident annotations parse and evaluate (data only while incidents open or close).
        for name, expr in annotation_exprs():
            result = prom.query(expr)
            assert result.get("status") == "success", f"annotation {name}: {expr}\n{result}"

        # Every alert rule expression parses and evaluates; Prometheus loaded and ran every rule cleanly.
        rules = rule_exprs()
        for name, expr in rules:
            result = prom.query(expr)
            assert result.get("status") == "success", f"rule {name}: {expr}\n{result}"
        loaded = [r for g in prom.api("rules")["data"]["groups"] for r in g["rules"]]
        assert sorted(r["name"] for r in loaded) == sorted(name for name, _ in rules)
        deadline = time.monotonic() + 10
        while any(r.get("health") != "ok" for r in loaded):
            bad = [(r["name"], r.get("health"), r.get("lastError")) for r in loaded if r.get("health") != "ok"]
            assert time.monotonic() < deadline and all(h == "unknown" for _, h, _ in bad), bad
            time.sleep(0.5)
            loaded = [r for g in prom.api("rules")["data"]["groups"] for r in g["rules"]]
        firing = [a["labels"]["alertname"] for a in prom.api("alerts")["data"]["alerts"]]
        assert "StreamDetectorDown" not in firing and "StreamDetectorTargetMissing" not in firing
        print(f"[operations] {len(targets)} panel queries, {len(rules)} rules checked "
              f"{time.monotonic() - started:.1f}s after worker start")
    finally:
        prom.stop()
        worker.stop()

    # STREAM_DETECTOR_LOG_JSON=true: every line the worker wrote (stdout and stderr) is one JSON object,
    # Faust's and aiokafka's records included.
    lines = [line for line in worker.log_path.read_text().splitlines() if line.strip()]
    assert lines
    loggers = set()
    for line in lines:
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            pytest.fail(f"worker log line is not JSON: {line!r}")
        assert isinstance(obj, dict) and {"ts", "level", "logger", "message"} <= set(obj), line
        loggers.add(obj["logger"].split(".")[0])
    assert {"stream_detector", "faust"} <= loggers, loggers
    assert any("invalid event" in orjson.loads(line)["message"] for line in lines)


def test_setup_logging_routes_everything_through_one_json_handler():
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, sys.excepthook, threading.excepthook)
    try:
        setup_logging("info", json_logs=True, stream=stream)
        logging.getLogger("faust.worker").info("Starting...")
        warnings.warn("deprecated thing", UserWarning)
        sys.excepthook(RuntimeError, RuntimeError("boom"), None)
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
        sys.excepthook, threading.excepthook = saved[2], saved[3]
        logging.captureWarnings(False)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [r["logger"] for r in records] == ["faust.worker", "py.warnings", "stream_detector.crash"]
    assert records[2]["level"] == "critical" and records[2]["exc_type"] == "RuntimeError"


def test_deploy_files_writes_the_stack_with_rules_for_another_job_that_promtool_still_passes(tmp_path):
    from stream_detector import cli

    assert cli.main(["deploy-files", "--out", str(tmp_path), "--job", "payments-detector",
                     "--runbook-url-base", "https://wiki.example/runbook"]) == 0
    for _, target in cli.DEPLOY_FILES:
        assert (tmp_path / target).is_file(), target
    prometheus = tmp_path / "deploy/prometheus"
    rules = (prometheus / "rules.yml").read_text()
    assert 'job="stream-detector"' not in rules and 'job="payments-detector"' in rules
    assert 'runbook_url: "https://wiki.example/runbook#streamdetectordown"' in rules
    assert "job_name: payments-detector" in (prometheus / "prometheus.yml").read_text()
    promtool = _tool("promtool")
    result = _run([promtool, "check", "config", "prometheus.yml"], prometheus)
    assert result.returncode == 0, result.stdout + result.stderr
    result = _run([promtool, "test", "rules", "rules.test.yml", "kafka_exporter.rules.test.yml"], prometheus)
    assert result.returncode == 0, result.stdout + result.stderr  # the rule tests are rewritten alike
    assert cli.main(["deploy-files", "--out", str(tmp_path)]) == 2  # files exist: not overwritten without --force
