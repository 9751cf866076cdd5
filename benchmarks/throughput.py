#!/usr/bin/env python
"""Throughput and latency benchmark against a real local Kafka broker.

    .venv/bin/python benchmarks/throughput.py --out benchmarks/results/throughput.md

Writes a markdown report (and the same figures as JSON beside it) with the machine, the command
and every figure. Not a test: it takes 20 to 40 minutes and wants a quiet machine (it records the
load average it saw). ``--quick`` runs every part with small sizes (a smoke run, a few minutes).

What it measures, all in one run against one ``LocalBroker`` it starts itself:

- (a) ``passthrough``: a confluent-kafka consumer producing every message it reads to another
  topic, with no processing: the ceiling for a Python pipeline on this machine and broker.
- (b) ``detector``: the worker (a subprocess, as a user runs it, default settings) draining a
  pre-filled topic: the default LSTM autoencoder, window 32, 8 features, ``--keys`` keys.
- (c) ``per-event``: the same worker with ``batch_max=1``: one window per model call, the
  per-event ``model.predict`` pattern.
- (d) ``river-hst``: River ``HalfSpaceTrees`` per key in the same worker frame
  (``benchmarks/variant_worker.py hst``).
- (f) ``faust-ceiling``: a Faust agent that only counts the events it takes from the same topic
  (``benchmarks/variant_worker.py faust-ceiling``): the ceiling of any Faust worker here.
- fast-path variants of (b): thread counts, batching, scoring stride, the full-window decoder.
- ``model-only``: ``ModelRunner.score`` on windows, batch sizes 1 to 4096, per thread count.
- event-to-alert latency at 50 % and 90 % of (b)'s sustained rate: events produced at a fixed
  rate (2 % injected anomalies), latency = the alert's broker append time minus its triggering
  event's broker append time (both topics use ``LogAppendTime``), for ``open``/``update``
  messages (whose ``event_id`` is the event that triggered them).
- memory per active key: the window store's and thresholds' accounting, and the RSS growth of a
  ``Detector`` taking ``--memory-keys`` keys (each scored twice, so threshold state exists).

Sustained rate: the worker's ``stream_detector_events_consumed_total``, sampled every 0.2 s,
between the moment it passes ``max(10 %, twice the warm-up share)`` of the events (the first W-1
events of every key only fill windows, and are cheaper; twice, because a fetch hands over one
partition's records ahead of the others', and a per-key model is built on its key's first scored
event) and the moment it passes 90 % (or ``--time-box``
seconds later, for the slow variants). CPU: utime + stime of the worker process over the same
interval (``/proc/<pid>/stat``), in cores. Peak RSS: ``VmHWM``. Each figure is the median of
``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

WINDOW = 32
CLK_TCK = os.sysconf("SC_CLK_TCK")
DEFAULT_BATCH_SIZES = (1, 4, 16, 64, 256, 1024, 4096)


# --- machine and process accounting ------------------------------------------------------------

def machine() -> dict[str, Any]:
    import confluent_kafka
    import faust
    import torch

    model = platform.processor() or ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
                break
    except (OSError, subprocess.SubprocessError):
        pass
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    try:
        import river
        river_version = river.__version__
    except ImportError:
        river_version = None
    from stream_detector.kafka.local_broker import KAFKA_VERSION
    return {
        "cpu": model, "cores": os.cpu_count(), "ram_gib": round(mem_kb / 2**20, 1),
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "numpy": np.__version__, "faust": faust.__version__, "confluent_kafka": confluent_kafka.version()[0],
        "librdkafka": confluent_kafka.libversion()[0], "river": river_version, "kafka": KAFKA_VERSION,
        "cuda": torch.cuda.is_available(),
    }


def load_snapshot() -> dict[str, Any]:
    """Load average and other benchmark-looking processes: whether the machine was quiet."""
    load = os.getloadavg()
    others = []
    me = os.getpid()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(word in cmd for word in ("pytest", "trainer", "quality.py", "kafka.Kafka")) and "throughput" not in cmd:
            others.append(cmd[:120])
    return {"loadavg": [round(x, 2) for x in load], "other_processes": others}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def peak_rss_mib(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def median(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(statistics.median(values)) if values else float("nan")


# --- events ------------------------------------------------------------------------------------

def sensor_payloads(n_keys: int, per_key: int, anomaly_rate: float = 0.0, seed: int = 0,
                    prefix: str = "device") -> list[tuple[bytes, bytes]]:
    """(key, JSON value) of ``n_keys`` devices x ``per_key`` readings, in arrival (timestamp) order."""
    import orjson

    from stream_detector.synthetic import sensor_key_stream

    rng = np.random.default_rng(seed)
    streams = []
    for k in range(n_keys):
        key = f"{prefix}-{k:05d}"
        events = sensor_key_stream(key, per_key, rng, anomaly_rate, run=f"s{seed}")
        streams.append([(key.encode(), orjson.dumps(e.to_message())) for e in events])
    # Every device reads once a second from the same start: arrival order is round-robin.
    return [streams[k][j] for j in range(per_key) for k in range(n_keys)]


def producer_config(bootstrap: str, **extra: Any) -> dict[str, Any]:
    return {"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True, "linger.ms": 5,
            "queue.buffering.max.messages": 500_000, **extra}


def produce_all(bootstrap: str, topic: str, payloads: Sequence[tuple[bytes, bytes]]) -> float:
    from confluent_kafka import Producer

    producer = Producer(producer_config(bootstrap, **{"linger.ms": 20, "batch.size": 1_000_000}))
    started = time.perf_counter()
    for key, value in payloads:
        while True:
            try:
                producer.produce(topic, value=value, key=key)
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(120) != 0:
        raise RuntimeError("backlog not delivered")
    return len(payloads) / (time.perf_counter() - started)


def make_topics(bootstrap: str, topics: dict[str, int], log_append_time: bool = False) -> None:
    from stream_detector.kafka.admin import ensure_topics

    config = {"message.timestamp.type": "LogAppendTime"} if log_append_time else None
    ensure_topics(bootstrap, topics, config=config)


def read_topic(bootstrap: str, topic: str, expected: int | None = None, idle_s: float = 5.0,
               timeout_s: float = 300.0) -> list[tuple[float, bytes]]:
    """(broker timestamp seconds, value) of every record of a topic."""
    from confluent_kafka import Consumer, KafkaError

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-reader-{uuid.uuid4().hex[:8]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    out: list[tuple[float, bytes]] = []
    last = time.monotonic()
    deadline = last + timeout_s
    try:
        while time.monotonic() < deadline:
            msgs = consumer.consume(10_000, 0.5)
            if not msgs:
                if (expected is not None and len(out) >= expected) or time.monotonic() - last > idle_s:
                    break
                continue
            last = time.monotonic()
            for m in msgs:
                if m.error():
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        continue
                    raise RuntimeError(f"consumer error: {m.error()}")
                out.append((m.timestamp()[1] / 1000.0, m.value()))
    finally:
        consumer.close()
    return out


# --- (a) passthrough ---------------------------------------------------------------------------

def passthrough_child(bootstrap: str, source: str, sink: str, n: int, lo: float, hi: float) -> dict[str, Any]:
    """Consume -> produce, no processing; rate between ``lo`` and ``hi`` of ``n`` messages."""
    from confluent_kafka import Consumer, Producer

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"passthrough-{uuid.uuid4().hex[:8]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": True,
                         "auto.commit.interval.ms": 1000})
    producer = Producer(producer_config(bootstrap))
    consumer.subscribe([source])
    seen = 0
    mark_lo = mark_hi = None
    n_lo, n_hi = int(n * lo), int(n * hi)
    produce, poll = producer.produce, producer.poll
    deadline = time.monotonic() + 600
    while seen < n and time.monotonic() < deadline:
        for m in consumer.consume(1000, 0.5):
            if m.error():
                continue
            while True:
                try:
                    produce(sink, value=m.value(), key=m.key())
                    break
                except BufferError:
                    poll(0.01)
            seen += 1
            if mark_lo is None and seen >= n_lo:
                mark_lo = (time.perf_counter(), time.process_time(), seen)
            if mark_hi is None and seen >= n_hi:
                mark_hi = (time.perf_counter(), time.process_time(), seen)
        poll(0)
    producer.flush(60)
    consumer.close()
    if mark_lo is None or mark_hi is None:
        raise RuntimeError(f"passthrough consumed {seen} of {n}")
    dt = mark_hi[0] - mark_lo[0]
    return {"events_per_s": (mark_hi[2] - mark_lo[2]) / dt, "cpu_cores": (mark_hi[1] - mark_lo[1]) / dt,
            "peak_rss_mib": peak_rss_mib(), "measured_events": mark_hi[2] - mark_lo[2], "seconds": dt}


def run_passthrough(bootstrap: str, source: str, n: int, lo: float, hi: float, partitions: int) -> dict[str, Any]:
    sink = f"passthrough-out-{uuid.uuid4().hex[:8]}"
    make_topics(bootstrap, {sink: partitions})
    out = subprocess.run([sys.executable, __file__, "_passthrough", bootstrap, source, sink, str(n), str(lo), str(hi)],
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"passthrough failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- the worker as a subprocess ----------------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Worker:
    """The real worker (or a variant of it) as a subprocess, configured by environment variables."""

    def __init__(self, bootstrap: str, model_dir: Path, input_topic: str, log_path: Path,
                 settings: dict[str, str] | None = None, variant: str | None = None):
        self.port = free_port()
        self.alerts_topic = f"alerts-{uuid.uuid4().hex[:8]}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_DETECTOR_")}
        env.update({
            "STREAM_DETECTOR_BOOTSTRAP_SERVERS": bootstrap,
            "STREAM_DETECTOR_INPUT_TOPIC": input_topic,
            "STREAM_DETECTOR_ALERTS_TOPIC": self.alerts_topic,
            "STREAM_DETECTOR_DEAD_LETTER_TOPIC": f"dlq-{uuid.uuid4().hex[:8]}",
            "STREAM_DETECTOR_CONSUMER_GROUP": f"bench-{uuid.uuid4().hex[:8]}",
            "STREAM_DETECTOR_MODEL_DIR": str(model_dir),
            "STREAM_DETECTOR_METRICS_PORT": str(self.port),
            "STREAM_DETECTOR_LOG_LEVEL": "warning",
            "PYTHONUNBUFFERED": "1",
        })
        env.update({f"STREAM_DETECTOR_{k.upper()}": str(v) for k, v in (settings or {}).items()})
        self.env = env
        cmd = [sys.executable, "-m", "stream_detector", "worker"]
        if variant:
            cmd = [sys.executable, str(ROOT / "benchmarks" / "variant_worker.py"), variant]
        self.cmd = cmd
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> "Worker":
        return self.launch().wait_up(timeout)

    def launch(self) -> "Worker":
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        return self

    def wait_up(self, timeout: float = 180.0) -> "Worker":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            try:
                self.metrics()
                return self
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"worker did not come up: {self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def check(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"worker exited with {self.process.returncode}: {self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])
        except OSError:
            return "<no log>"

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def consumed(self) -> float:
        for attempt in range(20):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as resp:
                    for line in resp.read().decode().splitlines():
                        if line.startswith("stream_detector_events_consumed_total "):
                            return float(line.split()[1])
                return 0.0
            except OSError:  # a scrape refused while the worker is busy starting: try again
                self.check()
                time.sleep(0.1)
        raise RuntimeError("metrics endpoint keeps failing")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def histogram(metrics: dict[str, float], name: str) -> dict[str, Any]:
    """Buckets, count and sum of a Prometheus histogram; quantiles interpolated within buckets."""
    buckets = sorted((float(k.split('le="')[1].split('"')[0]), v) for k, v in metrics.items()
                     if k.startswith(name + "_bucket{"))
    count = metrics.get(name + "_count", 0.0)
    total = metrics.get(name + "_sum", 0.0)

    def quantile(q: float) -> float | None:
        if not count:
            return None
        rank, prev_le, prev_c = q * count, 0.0, 0.0
        for le, c in buckets:
            if c >= rank:
                if math.isinf(le):
                    return prev_le
                return prev_le + (le - prev_le) * ((rank - prev_c) / (c - prev_c) if c > prev_c else 1.0)
            prev_le, prev_c = le, c
        return None

    return {"count": count, "mean": total / count if count else None, "p50": quantile(0.5), "p99": quantile(0.99)}


def run_backlog(bootstrap: str, model_dir: Path, topic: str, n: int, lo: float, hi: float, log_path: Path,
                settings: dict[str, str] | None = None, variant: str | None = None,
                time_box: float | None = None, timeout: float = 900.0, processes: int = 1) -> dict[str, Any]:
    """Worker(s) drain a pre-filled topic; sustained rate, CPU and peak RSS over [lo, hi] of it.

    With ``processes`` > 1, that many worker processes in one consumer group (launched together, so
    they share the partitions from the start); rates, CPU and RSS are their sums."""
    if processes > 1:
        settings = dict(settings or {}, consumer_group=f"bench-{uuid.uuid4().hex[:8]}")
    workers = [Worker(bootstrap, model_dir, topic, log_path.with_name(f"{log_path.stem}-p{i}{log_path.suffix}")
                      if processes > 1 else log_path, settings, variant) for i in range(processes)]
    for worker in workers:
        worker.launch()
    n_lo, n_hi = n * lo, n * hi
    try:
        for worker in workers:
            worker.wait_up()
        samples: list[tuple[float, float, float]] = []  # (time, consumed, cpu seconds)
        mark_lo = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for worker in workers:
                worker.check()
            now = time.perf_counter()
            consumed = sum(worker.consumed() for worker in workers)
            cpu = sum(cpu_seconds(worker.pid) for worker in workers)
            samples.append((now, consumed, cpu))
            if mark_lo is None and consumed >= n_lo:
                mark_lo = _interpolate(samples, n_lo)
            if mark_lo is not None and (consumed >= n_hi or (time_box and now - mark_lo[0] >= time_box)):
                break
            time.sleep(0.2)
        else:
            raise TimeoutError(f"worker consumed {samples[-1][1]:.0f} of {n} in {timeout:.0f}s")
        if consumed >= n_hi:
            mark_hi = _interpolate(samples, n_hi)
        else:
            mark_hi = samples[-1]
        finals = [worker.metrics() for worker in workers]
        rss = sum(peak_rss_mib(worker.pid) for worker in workers)
    finally:
        for worker in workers:
            worker.stop()
    dt = mark_hi[0] - mark_lo[0]
    final = {name: sum(f.get(name, 0.0) for f in finals) for name in set().union(*finals)}
    batches = histogram(final, "stream_detector_batch_windows")
    inference = histogram(final, "stream_detector_inference_seconds")
    return {
        "events_per_s": (mark_hi[1] - mark_lo[1]) / dt,
        "cpu_cores": (mark_hi[2] - mark_lo[2]) / dt,
        "peak_rss_mib": rss,
        "measured_events": mark_hi[1] - mark_lo[1],
        "seconds": dt,
        "batch_windows_mean": batches["mean"],
        "inference_ms_mean": inference["mean"] * 1000 if inference["mean"] is not None else None,
        "windows_scored": final.get("stream_detector_windows_scored_total"),
        "events_unscored": final.get("stream_detector_events_unscored_total"),
    }


def _interpolate(samples: list[tuple[float, float, float]], target: float) -> tuple[float, float, float]:
    """(time, consumed, cpu) when the consumed count crossed ``target``, linearly between samples."""
    for (t0, c0, u0), (t1, c1, u1) in zip(samples, samples[1:]):
        if c0 < target <= c1:
            f = (target - c0) / (c1 - c0)
            return (t0 + f * (t1 - t0), target, u0 + f * (u1 - u0))
    return samples[-1]


# --- latency -----------------------------------------------------------------------------------

def run_latency(bootstrap: str, model_dir: Path, rate: float, payloads: list[tuple[bytes, bytes]], n_keys: int,
                warm_events: int, partitions: int, log_path: Path,
                settings: dict[str, str] | None = None) -> dict[str, Any]:
    """Events at a fixed rate; event-to-alert latency from both topics' broker append times."""
    import orjson
    from confluent_kafka import Producer

    topic = f"latency-{uuid.uuid4().hex[:8]}"
    make_topics(bootstrap, {topic: partitions}, log_append_time=True)
    worker = Worker(bootstrap, model_dir, topic, log_path, settings)
    make_topics(bootstrap, {worker.alerts_topic: 1}, log_append_time=True)
    worker.start()
    try:
        time.sleep(5.0)  # consumer group joined before the clock starts
        producer = Producer(producer_config(bootstrap))
        started = time.perf_counter()
        cpu0 = cpu_seconds(worker.pid)
        sent = 0
        total = len(payloads)
        while sent < total:
            due = min(int((time.perf_counter() - started) * rate) + 1, total)
            while sent < due:
                key, value = payloads[sent]
                try:
                    producer.produce(topic, value=value, key=key)
                except BufferError:
                    producer.poll(0.01)
                    continue
                sent += 1
            producer.poll(0)
            time.sleep(0.001)
        produce_s = time.perf_counter() - started
        cpu1 = cpu_seconds(worker.pid)
        producer.flush(60)
        deadline = time.monotonic() + 120
        while worker.consumed() < total and time.monotonic() < deadline:
            worker.check()
            time.sleep(0.2)
        caught_up_s = time.perf_counter() - started
        time.sleep(2.0)  # the last alerts acknowledged
        final = worker.metrics()
    finally:
        worker.stop()
    appended: dict[bytes, float] = {}
    for ts, value in read_topic(bootstrap, topic, expected=total):
        doc = orjson.loads(value)
        appended[doc["event_id"].encode()] = ts
    latencies = []
    for ts, value in read_topic(bootstrap, worker.alerts_topic, idle_s=3.0):
        alert = orjson.loads(value)
        if alert.get("state") not in ("open", "update"):
            continue  # a close names the incident's last over-threshold window, not its trigger
        event_id = alert["event_id"]
        if int(event_id.rsplit("-", 1)[1]) < warm_events:
            continue
        source = appended.get(event_id.encode())
        if source is not None:
            latencies.append(ts - source)
    lat = np.array(latencies) * 1000.0
    hist = histogram(final, "stream_detector_event_to_alert_seconds")
    return {
        "rate_target": rate, "rate_achieved": total / produce_s, "events": total, "alerts_measured": len(lat),
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p95_ms": float(np.percentile(lat, 95)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "max_ms": float(lat.max()) if len(lat) else None,
        "worker_cpu_cores": (cpu1 - cpu0) / produce_s,
        "drain_s_after_last_event": caught_up_s - produce_s,
        "worker_hist_p50_ms": hist["p50"] * 1000 if hist["p50"] is not None else None,
        "worker_hist_p99_ms": hist["p99"] * 1000 if hist["p99"] is not None else None,
        "batch_windows_mean": histogram(final, "stream_detector_batch_windows")["mean"],
    }


# --- model only --------------------------------------------------------------------------------

def model_only(model_dir: Path, batch_sizes: Sequence[int], threads: Sequence[int], repeats: int,
               min_seconds: float) -> dict[str, Any]:
    """``ModelRunner.score`` windows/s per batch size and thread count (median of repeats)."""
    import torch

    from stream_detector.artifacts import load_artifact
    from stream_detector.models.base import newest_steps_error
    from stream_detector.scoring import ModelRunner, configure_threads

    artifact = load_artifact(model_dir)
    runner = ModelRunner(artifact, device="cpu", max_batch=max(batch_sizes))
    center = np.asarray(artifact.scaler.center, np.float32)
    scale = np.asarray(artifact.scaler.scale, np.float32)
    rng = np.random.default_rng(0)
    windows = (center + scale * rng.normal(size=(max(batch_sizes), WINDOW, len(center)))).astype(np.float32)

    def full_decoder(x: np.ndarray) -> None:  # the model's path before the newest-steps-only decoder
        with torch.inference_mode():
            t = runner.preprocess(torch.from_numpy(x))
            newest_steps_error(runner.model(t), t, runner.model.score_steps)

    def rate(fn: Callable[[np.ndarray], Any], batch: int) -> float:
        x = windows[:batch]
        fn(x)
        calls, started = 0, time.perf_counter()
        while True:
            fn(x)
            calls += 1
            elapsed = time.perf_counter() - started
            if elapsed >= min_seconds and calls >= 3:
                return batch * calls / elapsed

    out: dict[str, Any] = {"scorer": {}, "full_decoder": {}}
    for n_threads in threads:
        configure_threads(n_threads)
        out["scorer"][str(n_threads)] = {str(b): median([rate(runner.score, b) for _ in range(repeats)])
                                         for b in batch_sizes}
        if hasattr(runner.model, "score_steps"):
            out["full_decoder"][str(n_threads)] = {str(b): median([rate(full_decoder, b) for _ in range(repeats)])
                                                   for b in batch_sizes if b >= 16}
    configure_threads(0)
    best = max((v, t, b) for t, row in out["scorer"].items() for b, v in row.items())
    out["best"] = {"windows_per_s": best[0], "threads": int(best[1]), "batch": int(best[2])}
    return out


# --- memory per key ----------------------------------------------------------------------------

def memory_child(model_dir: str, n_keys: int) -> dict[str, Any]:
    """RSS growth of a Detector taking ``n_keys`` keys, each with W+1 events (two scored windows)."""
    from stream_detector.artifacts import load_artifact
    from stream_detector.detector import Detector
    from stream_detector.events import Event
    from stream_detector.scoring import Scores

    artifact = load_artifact(Path(model_dir))
    n_features = artifact.profile.n_features
    chunk = 5000

    def scorer(windows: np.ndarray) -> Scores:  # normal scores: every key's threshold history fills
        return Scores(np.full(len(windows), 0.5, np.float32), np.zeros((len(windows), n_features), np.float32))

    detector = Detector(artifact, scorer=scorer, max_keys=n_keys, max_batch=chunk)
    detector._batch[:] = 0.0  # the micro-batch buffer is per worker, not per key: resident before the baseline
    values = tuple(float(v) for v in artifact.scaler.center)
    gc.collect()
    before = rss_bytes()
    for start in range(0, n_keys, chunk):
        keys = [f"device-{k:07d}" for k in range(start, min(start + chunk, n_keys))]
        for j in range(WINDOW + 1):
            events = [Event(key, f"{key}-{j}", 1_767_225_600.0 + j, values) for key in keys]
            batch = detector.prepare_events(events)
            detector.finish(batch, detector.score(batch))
        del events, batch
    gc.collect()
    after = rss_bytes()
    store = detector.windows.store
    threshold = detector.threshold
    window_bytes = store.window * store.n_features * 4
    return {
        "keys": len(store), "rss_delta_bytes_per_key": (after - before) / n_keys,
        "window_data_bytes": window_bytes,
        "store_bytes_per_key": store.bytes_per_key,
        "threshold_bytes_per_key": getattr(threshold, "bytes_per_key", 0),
        "threshold_keys": len(threshold) if hasattr(threshold, "__len__") else None,
        "beyond_window_bytes_per_key": (after - before) / n_keys - window_bytes,
    }


def run_memory(model_dir: Path, n_keys: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "_memory", str(model_dir), str(n_keys)], capture_output=True,
                         text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- training ----------------------------------------------------------------------------------

def train_default_model(out_dir: Path, epochs: int) -> Path:
    """The default sensors model (LSTM autoencoder, window 32, 8 features), briefly trained."""
    from stream_detector.profiles import SensorProfile
    from stream_detector.synthetic import SENSOR_CHANNELS, generate_runs
    from trainer.data import from_synthetic
    from trainer.fit import TrainConfig, train_and_save

    profile = SensorProfile(SENSOR_CHANNELS)
    data = from_synthetic(generate_runs("sensors", 20, 120, runs=3, seed=1000), profile)
    config = TrainConfig(window=WINDOW, epochs=epochs, seed=0, threads=0)
    path, _ = train_and_save(data.events, profile, config, out_dir, labels=data.labels, progress=False)
    return path


# --- report ------------------------------------------------------------------------------------

def fmt(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) or v is None]
    out = {k: median([r[k] for r in runs if r.get(k) is not None]) if any(r.get(k) is not None for r in runs)
           else None for k in keys}
    out["runs"] = runs
    return out


def write_report(path: Path, results: dict[str, Any]) -> None:
    r = results
    m = r["machine"]
    lines = [
        "# Throughput and latency",
        "",
        f"Generated by `benchmarks/throughput.py` on {r['date']} in {r['seconds'] / 60:.0f} minutes. "
        "Every figure is the median of the runs listed in the JSON beside this file "
        f"(`{path.with_suffix('.json').name}`).",
        "",
        "```bash",
        r["command"],
        "```",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores; RAM {m['ram_gib']} GiB; {m['platform']}",
        f"- Python {m['python']}, torch {m['torch']} (CPU), numpy {m['numpy']}, faust-streaming {m['faust']}, "
        f"confluent-kafka {m['confluent_kafka']} (librdkafka {m['librdkafka']}), river {m['river']}",
        f"- Kafka {m['kafka']} (single-node KRaft `LocalBroker` on the same machine, sharing its cores)",
        f"- Load average at start {r['load_start']['loadavg']}, at end {r['load_end']['loadavg']}",
    ]
    busy = r["load_start"]["other_processes"] + r["load_end"]["other_processes"]
    if busy:
        lines.append(f"- **Not quiet**: other processes were running ({len(busy)} seen, e.g. `{busy[0][:80]}`)")
    p = r["params"]
    lines += [
        f"- Workload: {p['keys']:,} keys x {p['events_per_key']} events = {p['events']:,} sensor events "
        f"({p['payload_bytes']} bytes of JSON on average), {p['partitions']} partitions"
        + (f" ((c): {p['c_keys']:,} keys, same events per key)" if p.get("c_keys") else "") + "; "
        f"{p['repeats']} runs per figure, interleaved; sustained rates from the moment {p['lo']:.1%} of the events "
        f"were consumed (every key's window full and scored) to {p['hi']:.0%} of them or {p['time_box']:.0f} s later",
        f"- Model: `{r['model']['kind']}` version `{r['model']['version']}`, window {r['model']['window']}, "
        f"{r['model']['features']} features, hidden {r['model']['hidden']}, latent {r['model']['latent']}",
        "",
    ]
    rows = r["pipelines"]
    lines += ["## Sustained throughput", "",
              "| pipeline | events/s | CPU (cores) | peak RSS (MiB) | mean windows per model call |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for name, label in PIPELINE_LABELS:
        if name in rows:
            row = rows[name]
            lines.append(f"| {label} | {fmt(row['events_per_s'])} | {fmt(row['cpu_cores'], 2)} | "
                         f"{fmt(row['peak_rss_mib'])} | {fmt(row.get('batch_windows_mean'), 1)} |")
    lines.append("")
    mo = r.get("model_only")
    if mo:
        sizes = list(next(iter(mo["scorer"].values())).keys())
        lines += ["## Model only", "",
                  "`ModelRunner.score` on random windows around the training median (preprocessing included), "
                  "windows/s:", "",
                  "| threads | " + " | ".join(f"B={b}" for b in sizes) + " |",
                  "| --- | " + " | ".join("---:" for _ in sizes) + " |"]
        for t, row in mo["scorer"].items():
            lines.append(f"| {t} | " + " | ".join(fmt(row[b]) for b in sizes) + " |")
        for t, row in mo.get("full_decoder", {}).items():
            lines.append(f"| {t}, full-window decoder (before) | " +
                         " | ".join(fmt(row.get(b)) for b in sizes) + " |")
        best = mo["best"]
        lines += ["", f"Best: {fmt(best['windows_per_s'])} windows/s (batch {best['batch']}, "
                      f"{best['threads']} thread(s)).", ""]
    lat = r.get("latency")
    if lat:
        lines += ["## Event-to-alert latency", "",
                  "Events produced at a fixed rate (2 % injected anomalies); latency = the alert's broker "
                  "append time minus its triggering event's (both topics `LogAppendTime`), `open` and "
                  "`update` messages, events after each key's warm-up.", "",
                  "| pipeline, load | target events/s | achieved | alerts | p50 ms | p95 ms | p99 ms | max ms | "
                  "worker CPU | worker histogram p50 / p99 ms |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        labels = dict(PIPELINE_LABELS)
        for pipeline, shares in lat.items():
            label = "(b)" if pipeline == "detector" else labels.get(pipeline, pipeline)
            for name, row in shares.items():
                lines.append(
                    f"| {label}, {name} of (b)'s rate | {fmt(row['rate_target'])} | {fmt(row['rate_achieved'])} | "
                    f"{fmt(row['alerts_measured'])} | {fmt(row['p50_ms'], 1)} | {fmt(row['p95_ms'], 1)} | "
                    f"{fmt(row['p99_ms'], 1)} | {fmt(row['max_ms'], 1)} | {fmt(row['worker_cpu_cores'], 2)} | "
                    f"{fmt(row['worker_hist_p50_ms'], 1)} / {fmt(row['worker_hist_p99_ms'], 1)} |")
        lines.append("")
    mem = r.get("memory")
    if mem:
        lines += ["## Memory per active key", "",
                  f"A `Detector` taking {mem['keys']:,} keys, each with {WINDOW + 1} events (so each has a window "
                  "and per-key threshold state):", "",
                  f"- RSS growth: {fmt(mem['rss_delta_bytes_per_key'])} bytes per key, of which "
                  f"{mem['window_data_bytes']} are window data (W x F x 4): "
                  f"**{fmt(mem['beyond_window_bytes_per_key'])} bytes beyond the window**",
                  f"- accounted: window store {mem['store_bytes_per_key']} bytes per key "
                  f"(window data + {mem['store_bytes_per_key'] - mem['window_data_bytes']} bytes of count, "
                  f"source position, times), adaptive threshold {mem['threshold_bytes_per_key']} bytes; the "
                  "rest is Python's: the key string and the key's entries in the store's and thresholds' dicts",
                  ""]
    lines += ["## Ratios and targets", "",
              "| target | measured | result |", "| --- | --- | --- |"]
    for t in r["targets"]:
        lines.append(f"| {t['target']} | {t['measured']} | {t['result']} |")
    lines.append("")
    if r.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in r["notes"]] + [""]
    lines += fast_path_table(r)
    if r.get("fast_path"):
        lines += r["fast_path"] + [""]
    path.write_text("\n".join(lines))


# (variant, change, direction): "before" variants ran the former behaviour, "option" ones an opt-in.
FAST_PATH = [
    ("detector_full_decoder", "LSTM autoencoder decodes only the newest `score_steps` events (same scores)", "before"),
    ("detector_threads2", "`torch_threads=0` means cores - 1 (here 1) instead of all cores (here 2)", "before"),
    ("detector_fixed_batches", "adaptive micro-batches (`batch_adaptive`) instead of Faust's `take_events`", "before"),
    ("detector_faust_consumer", "Faust's consumer kept up (`kafka/faust_fastpath.py`): the three changes below "
                                "and a 65,536-event stream buffer, together", "before"),
    ("detector_faust_delivery", "delivery to the stream without four tasks per event (`consumer_fast_path`)",
     "before"),
    ("detector_buffer_4096", "`stream_buffer_max=65536` (Faust: 4,096)", "before"),
    ("detector_fetch_wait_1500", "`fetch_max_wait_ms=20` (Faust: 1,500)", "before"),
    ("detector_unpipelined", "pipelined micro-batches (`batch_pipeline`): the next batch windowed and scored while "
                             "this one is judged", "before"),
    ("detector_stride4", "opt-in `score_stride=4` for every key (`hot_key_rate=0`)", "option"),
    ("detector_flush_each_batch", "`state_flush_s=1` (was 0): each changed key written 1 s after it first "
                                  "changed, the writes spread over the batches, instead of every key a batch "
                                  "changed after every batch (the old behaviour below a backlog)", "before"),
    ("detector_flush_500ms", "`state_flush_s=1` (was 0.5): each changed key written 1 s after it first changed",
     "before"),
    ("detector_switch_500us", "`gil_switch_interval_s=0.0001` (was 0.0005): threads wait less for the GIL",
     "before"),
    ("detector_no_changelog", "not a change: what the window-state changelog costs (no snapshot writes)", "option"),
]


def fast_path_table(r: dict[str, Any]) -> list[str]:
    rows = r["pipelines"]
    b = rows.get("detector")
    if not b:
        return []
    lat = r.get("latency", {})
    lines = ["## Fast path: what each change bought", "",
             "Measured in this run: each \"before\" is (b) with that one change undone; each option is (b) with it "
             "turned on. Throughput in events/s (median of the runs); latency: p50 / p99 ms at 50 % of (b)'s rate "
             "where measured.", "",
             "| change | without | with | ratio | latency without | latency with |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]

    def latency(name: str) -> str:
        row = lat.get(name, {}).get("50%")
        return f"{fmt(row['p50_ms'], 1)} / {fmt(row['p99_ms'], 1)}" if row else "-"

    for name, change, kind in FAST_PATH:
        v = rows.get(name)
        if not v:
            continue
        without, with_ = (v, b) if kind == "before" else (b, v)
        lat_without, lat_with = (latency(name), latency("detector")) if kind == "before" else (latency("detector"),
                                                                                                latency(name))
        lines.append(f"| {change} | {fmt(without['events_per_s'])} | {fmt(with_['events_per_s'])} | "
                     f"{with_['events_per_s'] / without['events_per_s']:.2f}x | {lat_without} | {lat_with} |")
    mo = r.get("model_only")
    if mo and mo.get("full_decoder"):
        for t, row in mo["full_decoder"].items():
            best_full = max(row.values())
            best_new = max(v for k, v in mo["scorer"][t].items() if k in row)
            lines.append(f"| model only, {t} thread(s), best batch: newest-steps decoder | {fmt(best_full)} | "
                         f"{fmt(best_new)} | {best_new / best_full:.2f}x | - | - |")
    lines.append("")
    return lines


PIPELINE_LABELS = [
    ("passthrough", "(a) passthrough: confluent-kafka consume -> produce"),
    ("detector", "(b) detector, end to end (default settings)"),
    ("per_event", "(c) same worker, one window per model call (`batch_max=1`)"),
    ("river_hst", "(d) River HalfSpaceTrees per key, same worker frame"),
    ("faust_ceiling", "(f) Faust agent counting events, no processing: Faust's own ceiling"),
    ("detector_fixed_batches", "(b) with Faust's fixed batching (`batch_adaptive=false`): before"),
    ("detector_full_decoder", "(b) with the full-window decoder: before"),
    ("detector_threads2", "(b) with `torch_threads=2` (the former default on 2 cores): before"),
    ("detector_no_changelog", "(b) without window-state changelog writes (`state_min_events` = 10^9)"),
    ("faust_ceiling_faust_consumer", "(f) with Faust's consumer as it comes: before"),
    ("detector_faust_consumer", "(b) with Faust's consumer as it comes (per-event tasks, 4,096 buffer, "
                                "1.5 s fetch wait): before"),
    ("detector_faust_delivery", "(b) with Faust's per-event delivery tasks (`consumer_fast_path=false`): before"),
    ("detector_buffer_4096", "(b) with Faust's 4,096-event stream buffer: before"),
    ("detector_fetch_wait_1500", "(b) with Faust's 1.5 s fetch wait: before"),
    ("detector_flush_each_batch", "(b) writing every key a micro-batch changed after it (`state_flush_s=0`): before"),
    ("detector_two_processes", "(b) as two worker processes in one consumer group (sums)"),
    ("per_event_two_processes", "(c) as two worker processes in one consumer group (sums)"),
    ("detector_flush_1s", "(b) writing each changed key 1 s after it first changed (`state_flush_s=1`)"),
    ("detector_flush_250ms", "(b) writing each changed key 250 ms after it first changed (`state_flush_s=0.25`)"),
    ("detector_flush_500ms", "(b) writing each changed key 500 ms after it first changed (`state_flush_s=0.5`): "
                             "before"),
    ("detector_stride4", "(b) with `score_stride=4` on every key (`hot_key_rate=0`)"),
    ("detector_unpipelined", "(b) finishing each micro-batch before windowing the next (`batch_pipeline=false`): "
                             "before"),
    ("detector_switch_500us", "(b) with a 0.5 ms GIL switch interval (`gil_switch_interval_s=0.0005`): before"),
    ("per_event_switch_500us", "(c) with a 0.5 ms GIL switch interval (`gil_switch_interval_s=0.0005`): before"),
]

FAUST_CONSUMER = {"consumer_fast_path": "false", "stream_buffer_max": "4096", "fetch_max_wait_ms": "1500"}
VARIANTS: dict[str, dict[str, Any]] = {
    "detector_fixed_batches": {"settings": {"batch_adaptive": "false"}},
    "detector_full_decoder": {"variant": "full-decoder"},
    "detector_threads2": {"settings": {"torch_threads": "2"}},
    "detector_no_changelog": {"settings": {"state_min_events": "1000000000"}},
    "detector_flush_each_batch": {"settings": {"state_flush_s": "0"}},
    "detector_two_processes": {"processes": 2},
    "per_event_two_processes": {"settings": {"batch_max": "1"}, "processes": 2, "backlog": "c"},
    "detector_flush_1s": {"settings": {"state_flush_s": "1"}},
    "detector_flush_500ms": {"settings": {"state_flush_s": "0.5"}},
    "detector_flush_250ms": {"settings": {"state_flush_s": "0.25"}},
    "detector_stride4": {"settings": {"score_stride": "4"}},
    "detector_unpipelined": {"settings": {"batch_pipeline": "false"}},
    "detector_switch_500us": {"settings": {"gil_switch_interval_s": "0.0005"}},
    "per_event_switch_500us": {"settings": {"batch_max": "1", "gil_switch_interval_s": "0.0005"}, "backlog": "c"},
    # Faust's consumer as it comes: its per-event delivery tasks, 4,096-event stream buffer, 1.5 s fetch wait.
    "detector_faust_consumer": {"settings": FAUST_CONSUMER},
    "faust_ceiling_faust_consumer": {"variant": "faust-ceiling", "settings": FAUST_CONSUMER},
    "detector_faust_delivery": {"settings": {"consumer_fast_path": "false"}},
    "detector_buffer_4096": {"settings": {"stream_buffer_max": "4096"}},
    "detector_fetch_wait_1500": {"settings": {"fetch_max_wait_ms": "1500"}},
}


def targets(r: dict[str, Any]) -> list[dict[str, str]]:
    rows = r["pipelines"]
    out = []

    def add(target: str, measured: str, ok: bool | None | str) -> None:
        result = ok if isinstance(ok, str) else "unmeasured" if ok is None else ("met" if ok else "**not met**")
        out.append({"target": target, "measured": measured, "result": result})

    b = rows.get("detector", {}).get("events_per_s")
    a = rows.get("passthrough", {}).get("events_per_s")
    c = rows.get("per_event", {}).get("events_per_s")
    d = rows.get("river_hst", {}).get("events_per_s")
    mo = r.get("model_only", {}).get("best", {}).get("windows_per_s")
    if b and c:
        add("b/c >= 20", f"{b / c:.1f} ({fmt(b)} / {fmt(c)} events/s)", b / c >= 20)
    if b and a and mo:
        floor = 0.5 * min(a, mo)
        add("b >= 0.5 x min(a, m)", f"b = {fmt(b)}; a = {fmt(a)}, m = {fmt(mo)}: b/a = {b / a:.2f}, "
            f"b/m = {b / mo:.2f}", b >= floor)
    if b and d:
        add("b/d (no target)", f"{b / d:.1f}", "-")
    f = rows.get("faust_ceiling", {}).get("events_per_s")
    if b and f:
        add("b/f, share of Faust's own ceiling (no target)", f"{b / f:.2f} ({fmt(b)} / {fmt(f)} events/s)", "-")
    lat = r.get("latency", {}).get("detector", {}).get("50%")
    if lat:
        add("p99 event-to-alert <= 100 ms at 50 % of max", f"{fmt(lat['p99_ms'], 1)} ms "
            f"(p50 {fmt(lat['p50_ms'], 1)}, p95 {fmt(lat['p95_ms'], 1)}; {lat['alerts_measured']} alerts)",
            lat["p99_ms"] is not None and lat["p99_ms"] <= 100)
    mem = r.get("memory")
    if mem:
        add("<= 2 KB per active key beyond the window data", f"{fmt(mem['beyond_window_bytes_per_key'])} bytes",
            mem["beyond_window_bytes_per_key"] <= 2048)
    add("GPU: model-only >= 1,000,000 windows/s, model resident, one host-to-device copy per batch",
        "unmeasured (no GPU on this machine)", None)
    return out


# --- main --------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "throughput.md")
    parser.add_argument("--model-dir", type=Path, help="an artifact to serve (default: train one briefly)")
    parser.add_argument("--train-epochs", type=int, default=3)
    parser.add_argument("--keys", type=int, default=2000)
    parser.add_argument("--events-per-key", type=int, default=200)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--time-box", type=float, default=40.0,
                        help="most seconds measured per worker run (from the warm-up mark; 90 %% of the events "
                             "ends it earlier)")
    parser.add_argument("--latency-seconds", type=float, default=30.0, help="measured part of each latency run")
    parser.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)))
    parser.add_argument("--memory-keys", type=int, default=100_000)
    parser.add_argument("--parts", default="model,memory,a,b,c,d,f,variants,latency",
                        help="comma-separated subset of: model,memory,a,b,c,d,f,variants,latency")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="fast-path variants of (b) to run")
    parser.add_argument("--latency-variants", default="detector_fixed_batches",
                        help="variants whose latency is measured too (settings variants only)")
    parser.add_argument("--fast-path-notes", type=Path, default=ROOT / "benchmarks" / "results" / "fast_path.md",
                        help="markdown appended to the report as the fast-path change log (if it exists)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every part")
    args = parser.parse_args(argv)
    if args.quick:
        args.keys, args.events_per_key, args.repeats = 200, 80, 1
        args.time_box, args.latency_seconds, args.memory_keys = 5.0, 6.0, 5000
        args.batch_sizes = "1,64,1024"
    parts = set(args.parts.split(","))
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    started = time.time()
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/throughput.py",
                                                      *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(), "load_start": load_snapshot(), "pipelines": {}, "notes": [],
    }
    print(f"load average {results['load_start']['loadavg']}", flush=True)
    from stream_detector.artifacts import load_artifact
    from stream_detector.kafka.local_broker import LocalBroker

    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = args.model_dir
        if model_dir is None:
            print(f"training the default sensors model ({args.train_epochs} epochs)...", flush=True)
            model_dir = train_default_model(tmp / "model", args.train_epochs)
        artifact = load_artifact(model_dir)
        cfg = artifact.model.config()
        results["model"] = {"kind": artifact.kind, "version": artifact.version, "window": artifact.window,
                            "features": artifact.profile.n_features, "hidden": cfg.get("hidden"),
                            "latent": cfg.get("latent")}
        if "model" in parts:
            print("model only...", flush=True)
            results["model_only"] = model_only(model_dir, batch_sizes, (1, 2), args.repeats,
                                               0.2 if args.quick else 1.0)
            print(json.dumps(results["model_only"]["best"]), flush=True)
        if "memory" in parts:
            print(f"memory per key ({args.memory_keys:,} keys)...", flush=True)
            results["memory"] = run_memory(model_dir, args.memory_keys)
            print(json.dumps(results["memory"]), flush=True)
        n = args.keys * args.events_per_key
        # Twice the window's share of each key's events: a fetch hands over one partition's records
        # (up to 1 MiB) ahead of the others', so at the bare window's share some keys' windows are
        # not full yet (cheaper events), and a per-key model (River's, in (d)) is built on its key's
        # first scored event (about 27 ms each): neither belongs in a sustained rate.
        lo = max(0.10, 2 * (WINDOW + 1) / args.events_per_key)
        hi = 0.90
        payloads = sensor_payloads(args.keys, args.events_per_key, seed=1)
        results["params"] = {"keys": args.keys, "events_per_key": args.events_per_key, "events": n,
                             "partitions": args.partitions, "repeats": args.repeats, "lo": lo, "hi": hi,
                             "time_box": args.time_box,
                             "payload_bytes": int(sum(len(v) for _, v in payloads[:1000]) / 1000)}
        with LocalBroker(data_dir=tmp / "kafka") as broker:
            bootstrap = broker.bootstrap_servers
            backlog = f"backlog-{uuid.uuid4().hex[:8]}"
            make_topics(bootstrap, {backlog: args.partitions})
            rate = produce_all(bootstrap, backlog, payloads)
            print(f"pre-produced {n:,} events ({rate:,.0f}/s)", flush=True)
            del payloads
            logs = tmp / "logs"
            logs.mkdir()
            plan: list[tuple[str, Callable[[int], dict[str, Any]]]] = []
            if "a" in parts:
                plan.append(("passthrough", lambda i: run_passthrough(bootstrap, backlog, n, lo, hi, args.partitions)))
            if "b" in parts:
                plan.append(("detector", lambda i: run_backlog(bootstrap, model_dir, backlog, n, lo, hi,
                                                               logs / f"b{i}.log", time_box=args.time_box)))
            if "c" in parts:
                # One window per call is ~20x slower: the same events from a tenth of the keys, so its
                # windows are full (the measured part begins) in seconds rather than minutes.
                c_keys = max(args.keys // 10, 20)
                c_n = c_keys * args.events_per_key
                c_lo = lo
                c_backlog = f"backlog-c-{uuid.uuid4().hex[:8]}"
                make_topics(bootstrap, {c_backlog: args.partitions})
                produce_all(bootstrap, c_backlog, sensor_payloads(c_keys, args.events_per_key, seed=2))
                results["params"]["c_keys"] = c_keys
                plan.append(("per_event", lambda i: run_backlog(bootstrap, model_dir, c_backlog, c_n, c_lo, hi,
                                                                logs / f"c{i}.log", {"batch_max": "1"},
                                                                time_box=args.time_box)))
            if "d" in parts:
                plan.append(("river_hst", lambda i: run_backlog(bootstrap, model_dir, backlog, n, lo, hi,
                                                                logs / f"d{i}.log", variant="hst",
                                                                time_box=args.time_box)))
            if "f" in parts:
                plan.append(("faust_ceiling", lambda i: run_backlog(bootstrap, model_dir, backlog, n, lo, hi,
                                                                    logs / f"f{i}.log", variant="faust-ceiling",
                                                                    time_box=args.time_box)))
            if "variants" in parts:
                for name in [v for v in args.variants.split(",") if v]:
                    spec = VARIANTS[name]
                    if spec.get("backlog") == "c" and "c" not in parts:
                        raise SystemExit(f"variant {name} runs on (c)'s topic: add c to --parts")
                    topic, n_v, lo_v = (c_backlog, c_n, c_lo) if spec.get("backlog") == "c" else (backlog, n, lo)
                    plan.append((name, lambda i, name=name, spec=spec, topic=topic, n_v=n_v, lo_v=lo_v: run_backlog(
                        bootstrap, model_dir, topic, n_v, lo_v, hi, logs / f"{name}{i}.log", spec.get("settings"),
                        spec.get("variant"), time_box=args.time_box, processes=spec.get("processes", 1))))
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in plan}
            for i in range(args.repeats):  # interleaved, so slow drifts of the machine hit every pipeline alike
                for name, fn in plan:
                    try:
                        row = fn(i)
                    except Exception as exc:  # one broken variant must not lose the others' figures
                        print(f"  {name} run {i + 1} failed: {exc}", flush=True)
                        results["notes"].append(f"{name} run {i + 1} failed: {str(exc)[:300]}")
                        continue
                    runs[name].append(row)
                    print(f"  {name} run {i + 1}: {row['events_per_s']:,.0f} events/s, "
                          f"{row['cpu_cores']:.2f} cores, {row['peak_rss_mib']:.0f} MiB", flush=True)
            results["pipelines"] = {name: summarise(rows) for name, rows in runs.items() if rows}
            if "latency" in parts and "detector" in results["pipelines"]:
                # Both loads are shares of (b)'s sustained rate, for the variants too: the same offered load.
                peak = results["pipelines"]["detector"]["events_per_s"]
                results["latency"] = {}
                warm = 48  # the generator injects anomalies from each key's 48th event on
                configs = [("detector", None)] + [(name, VARIANTS[name].get("settings"))
                                                  for name in args.latency_variants.split(",") if name]
                for share in (0.5, 0.9):
                    rate = peak * share
                    per_key = warm + max(int(math.ceil(rate * args.latency_seconds / args.keys)), 10)
                    stream = sensor_payloads(args.keys, per_key, anomaly_rate=0.02, seed=7, prefix="sensor")
                    for name, settings in configs:
                        rows = []
                        for i in range(args.repeats):
                            try:
                                row = run_latency(bootstrap, model_dir, rate, stream, args.keys, warm,
                                                  args.partitions, logs / f"lat-{name}-{share}-{i}.log", settings)
                            except Exception as exc:
                                print(f"  latency {name} at {share:.0%} run {i + 1} failed: {exc}", flush=True)
                                results["notes"].append(f"latency {name} at {share:.0%} run {i + 1} failed: "
                                                        f"{str(exc)[:300]}")
                                continue
                            rows.append(row)
                            print(f"  latency {name} at {share:.0%} ({rate:,.0f}/s) run {i + 1}: p50 "
                                  f"{fmt(row['p50_ms'], 1)} p99 {fmt(row['p99_ms'], 1)} ms over "
                                  f"{row['alerts_measured']} alerts", flush=True)
                        if rows:
                            results["latency"].setdefault(name, {})[f"{share:.0%}"] = summarise(rows)
    results["load_end"] = load_snapshot()
    results["seconds"] = time.time() - started
    results["targets"] = targets(results)
    if args.fast_path_notes and args.fast_path_notes.exists():
        results["fast_path"] = args.fast_path_notes.read_text().splitlines()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str))
    write_report(args.out, results)
    for t in results["targets"]:
        print(f"{t['target']}: {t['measured']} -> {t['result']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_passthrough":
        _, _, bootstrap_, source_, sink_, n_, lo_, hi_ = sys.argv
        print(json.dumps(passthrough_child(bootstrap_, source_, sink_, int(n_), float(lo_), float(hi_))))
    elif len(sys.argv) > 1 and sys.argv[1] == "_memory":
        print(json.dumps(memory_child(sys.argv[2], int(sys.argv[3]))))
    else:
        sys.exit(main())
