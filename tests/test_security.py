"""Kafka over TLS, with certificates made by the test, and secrets kept out of logs."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from stream_detector.kafka.local_broker import LocalBroker, ensure_topics
from stream_detector.producer import BrokerUnreachable, iter_messages, produce_events
from stream_detector.synthetic import generate

from worker_harness import WorkerProcess, free_port

pytestmark = pytest.mark.integration


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(directory: Path) -> tuple[Path, Path]:
    """A throwaway CA and a broker certificate for 127.0.0.1; returns (CA PEM, broker keystore PEM)."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=stream-detector-test-ca", cwd=directory)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "broker.key", "-out", "broker.csr",
             "-subj", "/CN=localhost", cwd=directory)
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "broker.crt", "-days", "2", "-extfile", "san.ext", cwd=directory)
    _openssl("pkcs8", "-topk8", "-nocrypt", "-in", "broker.key", "-out", "broker.p8", cwd=directory)
    keystore = directory / "broker-keystore.pem"
    keystore.write_text((directory / "broker.p8").read_text() + (directory / "broker.crt").read_text())
    return directory / "ca.pem", keystore


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make test certificates")
def test_worker_consumes_and_alerts_over_tls_and_keeps_secrets_out_of_its_log(sensor_model_dir, tmp_path):
    certs = tmp_path / "certs"
    certs.mkdir()
    ca, keystore = make_certificates(certs)
    broker = LocalBroker(data_dir=tmp_path / "kafka")
    tls_port = free_port()
    broker.extra_config.update({
        "listeners": f"PLAINTEXT://127.0.0.1:{broker.port},CONTROLLER://127.0.0.1:{broker.controller_port},"
                     f"SSL://127.0.0.1:{tls_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{broker.port},SSL://127.0.0.1:{tls_port}",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SSL:SSL",
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(keystore),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(ca),
        "ssl.client.auth": "none",
    })
    broker.start(timeout=120)
    tls = f"127.0.0.1:{tls_port}"
    client_tls = {"security.protocol": "ssl", "ssl.ca.location": str(ca)}
    secret = f"never-log-{uuid.uuid4().hex}"
    worker = WorkerProcess(tls, sensor_model_dir, tmp_path / "worker.log", extra_env={
        "STREAM_DETECTOR_SECURITY_PROTOCOL": "SSL",
        "STREAM_DETECTOR_SSL_CAFILE": str(ca),
        "STREAM_DETECTOR_SSL_KEY_PASSWORD": secret,  # unused without a client key, but must never be printed
    })
    try:
        ensure_topics(tls, {worker.input_topic: 2, worker.alerts_topic: 1}, client_config=client_tls)
        worker.start()
        events = generate("sensors", 4, 200, anomaly_rate=0.05, seed=61)
        produce_events(tls, worker.input_topic, events, rate=0, extra_config=client_tls)
        worker.wait_for_metric("stream_detector_events_consumed_total", len(events), timeout=180)
        worker.wait_for_metric("stream_detector_windows_scored_total", len(events) - 4 * 31, timeout=60)
        alerts = list(iter_messages(tls, worker.alerts_topic, idle_timeout=5.0, extra_config=client_tls))
        assert alerts, "anomalies were injected: alerts must arrive over TLS"

        # A plaintext client gets nothing from the TLS listener, and is told so rather than reading nothing.
        with pytest.raises(BrokerUnreachable, match="security settings"):
            list(iter_messages(tls, worker.alerts_topic, idle_timeout=3.0,
                               extra_config={"security.protocol": "plaintext"}))
        log = worker.log_path.read_text()
        assert secret not in log
        assert "ssl_key_password" in log and "'***'" in log  # the settings line is there, masked
    finally:
        worker.stop()
        broker.stop()
