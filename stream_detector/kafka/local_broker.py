"""Run a real single-node Apache Kafka 3.9.1 broker (KRaft, no ZooKeeper) locally.

Why: the demo and the integration tests need real Kafka semantics (consumer
groups, offsets, restarts, crashes) and this environment has no docker and no
Kafka install. The jars come from Maven Central via ``deploy/kafka/fetch-kafka.sh``
into a git-ignored cache; the broker is a plain ``java`` subprocess bound only
to 127.0.0.1.

Usage::

    with LocalBroker() as broker:
        ensure_topics(broker.bootstrap_servers, {"events": 3})
        ...

or from a shell: ``python -m stream_detector.kafka.local_broker --port 9092``.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import IO, Sequence

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from .admin import TopicError, ensure_topics  # noqa: F401  (re-exported for callers)

__all__ = ["BrokerError", "LocalBroker", "ensure_topics", "main"]

log = logging.getLogger(__name__)

KAFKA_VERSION = "3.9.1"
KAFKA_HOME_ENV = "STREAM_DETECTOR_KAFKA_HOME"
REPO_ROOT = Path(__file__).resolve().parents[2]
FETCH_SCRIPT = REPO_ROOT / "deploy" / "kafka" / "fetch-kafka.sh"
DEFAULT_KAFKA_HOME = REPO_ROOT / ".cache" / f"kafka-{KAFKA_VERSION}"
REPO_LOG4J = REPO_ROOT / "deploy" / "kafka" / "log4j.properties"

_POLL_INTERVAL_S = 0.2
# JVM flags: small heap (the broker holds little data locally) and the GC
# settings Kafka's own start scripts use.
_JVM_OPTS = (
    "-Xms256m",
    "-Xmx1g",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-Djava.awt.headless=true",
)

# Brokers started by this process; stopped at interpreter exit so a normal exit
# (including a failed pytest session) never leaks a JVM.
_LIVE_BROKERS: set[LocalBroker] = set()
# Temp data dirs LocalBroker created itself; removed at exit after the stop.
_OWNED_DATA_DIRS: list[Path] = []
_LIVE_LOCK = threading.Lock()


def _die_with_parent() -> None:
    """Linux: the broker is killed when the process that started it dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class BrokerError(RuntimeError):
    """The local broker could not be installed, started or reached."""


def _free_port(exclude: frozenset[int] | set[int] = frozenset()) -> int:
    """Pick a currently free TCP port on 127.0.0.1 (the OS chooses it)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in exclude:
            return port
    raise BrokerError("could not find a free port on 127.0.0.1")


def _port_open(port: int) -> bool:
    """Cheap readiness pre-check before creating a Kafka client."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _random_cluster_id() -> str:
    """Kafka-style cluster id: url-safe base64 of 16 random bytes, no padding.

    Like Kafka's ``Uuid.randomUuid`` it avoids ids starting with '-', which
    command-line parsers would take for an option.
    """
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")
        if not cid.startswith("-"):
            return cid


def _props_escape(value: str) -> str:
    """Escape a value for a java .properties file."""
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def _tail(path: Path, max_lines: int = 40, max_bytes: int = 16_384) -> str:
    """Last lines of a log file, for error messages."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode("utf-8", errors="replace")
    except OSError:
        return "<no broker log>"
    lines = data.splitlines()[-max_lines:]
    return "\n".join(lines) if lines else "<broker log is empty>"


def _java() -> str:
    """The java executable: $JAVA_HOME/bin/java, else java on PATH."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if not java:
        raise BrokerError("java not found (install Java 17+ or set JAVA_HOME)")
    return java


class LocalBroker:
    """A single-node Kafka broker+controller (KRaft) subprocess on 127.0.0.1.

    Ports and data dir are fixed for the object's lifetime, so ``restart()``
    (after ``stop()`` or a simulated crash via ``kill()``) brings back the same
    broker with the same data at the same bootstrap address.

    With ``proxy_port``, the broker also listens on a second port (``proxied_listener_port``)
    that it advertises as ``127.0.0.1:proxy_port``: clients given ``proxied_bootstrap_servers``
    reach it only through what forwards that port (a test's TCP proxy that can cut or slow them).
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        port: int | None = None,
        controller_port: int | None = None,
        kafka_home: Path | None = None,
        extra_config: dict[str, str] | None = None,
        proxy_port: int | None = None,
    ) -> None:
        # A temp data dir we created is ours to delete at interpreter exit;
        # a caller-supplied one is kept.
        self._owns_data_dir = data_dir is None
        if data_dir is None:
            data_dir = Path(tempfile.mkdtemp(prefix="stream-detector-kafka-"))
        self.data_dir = Path(data_dir).resolve()
        self.port = port if port is not None else _free_port()
        self.controller_port = (
            controller_port if controller_port is not None else _free_port({self.port})
        )
        if self.port == self.controller_port:
            raise ValueError("port and controller_port must differ")
        # A second listener, PROXIED, advertised at 127.0.0.1:proxy_port: a client that bootstraps
        # there is told to connect there for everything, so whatever listens on proxy_port and
        # forwards to `proxied_listener_port` (a test's TCP proxy) carries all of its traffic. Kafka
        # clients connect to the advertised address after the bootstrap, so a proxy in front of
        # `port` alone would be bypassed.
        self.proxy_port = proxy_port
        self.proxied_listener_port: int | None = (
            None if proxy_port is None
            else _free_port({self.port, self.controller_port, proxy_port})
        )
        env_home = os.environ.get(KAFKA_HOME_ENV)
        self.kafka_home = Path(
            kafka_home if kafka_home is not None else (env_home or DEFAULT_KAFKA_HOME)
        ).resolve()
        self.extra_config = dict(extra_config or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        if self._owns_data_dir:
            with _LIVE_LOCK:
                _OWNED_DATA_DIRS.append(self.data_dir)

    # ------------------------------------------------------------------ paths
    @property
    def bootstrap_servers(self) -> str:
        """Address clients should use, e.g. ``127.0.0.1:39123``."""
        return f"127.0.0.1:{self.port}"

    @property
    def proxied_bootstrap_servers(self) -> str:
        """The address of the PROXIED listener (``proxy_port``); raises if there is none."""
        if self.proxy_port is None:
            raise BrokerError("this broker has no proxied listener (proxy_port not given)")
        return f"127.0.0.1:{self.proxy_port}"

    @property
    def libs_dir(self) -> Path:
        return self.kafka_home / "libs"

    @property
    def log_path(self) -> Path:
        """Broker stdout/stderr (also the storage-format output)."""
        return self.data_dir / "broker.log"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def log_dirs(self) -> Path:
        """Kafka's data (topic partitions + KRaft metadata log)."""
        return self.data_dir / "kraft-logs"

    @property
    def _log4j_path(self) -> Path:
        candidate = self.kafka_home / "log4j.properties"
        return candidate if candidate.exists() else REPO_LOG4J

    # ---------------------------------------------------------------- install
    def ensure_installed(self) -> None:
        """Make sure the Kafka jars are in ``kafka_home/libs`` (fetching via Maven).

        The fetch script is idempotent and returns immediately once the cache is
        complete. Without the script (package used outside the repo) a
        pre-populated ``kafka_home`` is accepted.
        """
        if FETCH_SCRIPT.exists():
            env = dict(os.environ, **{KAFKA_HOME_ENV: str(self.kafka_home)})
            proc = subprocess.run(
                ["bash", str(FETCH_SCRIPT)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            if proc.returncode != 0:
                raise BrokerError(
                    f"fetching Kafka jars failed (rc={proc.returncode}):\n"
                    f"{proc.stderr[-4000:]}"
                )
        if not any(self.libs_dir.glob("kafka_2.13-*.jar")):
            raise BrokerError(
                f"no Kafka jars in {self.libs_dir}; run deploy/kafka/fetch-kafka.sh "
                f"(or set {KAFKA_HOME_ENV})"
            )

    # ----------------------------------------------------------------- config
    def _server_properties(self) -> dict[str, str]:
        listeners = f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}"
        advertised = f"PLAINTEXT://127.0.0.1:{self.port}"
        protocols = "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
        if self.proxy_port is not None:
            listeners += f",PROXIED://127.0.0.1:{self.proxied_listener_port}"
            advertised += f",PROXIED://127.0.0.1:{self.proxy_port}"
            protocols += ",PROXIED:PLAINTEXT"
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": listeners,
            "advertised.listeners": advertised,
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": protocols,
            "log.dirs": str(self.log_dirs),
            # Single node: every internal topic must fit on one replica.
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            # Fewer internal partitions: the first consumer group / transaction
            # comes up in a fraction of the time on a small machine.
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.num.partitions": "4",
            # Tests want consumer groups to start without the 3 s delay.
            "group.initial.rebalance.delay.ms": "0",
            "num.partitions": "1",
            "auto.create.topics.enable": "true",
            "delete.topic.enable": "true",
            # Small-machine friendly: few threads, small cleaner buffer
            # (default 128 MiB of heap).
            "num.network.threads": "2",
            "num.io.threads": "4",
            "num.recovery.threads.per.data.dir": "1",
            "background.threads": "4",
            "log.cleaner.threads": "1",
            "log.cleaner.dedupe.buffer.size": str(8 * 1024 * 1024),
            "log.segment.bytes": str(64 * 1024 * 1024),
            "log.retention.hours": "168",
            # After a crash (kill()) the restarted broker cannot re-register until
            # the controller expires its old session (default 9 s, observed ~14 s
            # restart). A short session makes crash-recovery restarts quick; the
            # broker heartbeats its in-process controller over loopback.
            "broker.heartbeat.interval.ms": "500",
            "broker.session.timeout.ms": "3000",
        }
        props.update({k: str(v) for k, v in self.extra_config.items()})
        return props

    def _write_config(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        lines = ["# Generated by stream_detector.kafka.local_broker; rewritten on every start."]
        lines += [f"{k}={_props_escape(v)}" for k, v in self._server_properties().items()]
        self.config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _java_cmd(self, main_class: str, *args: str, jvm_opts: Sequence[str] = ()) -> list[str]:
        return [
            _java(),
            *jvm_opts,
            f"-Dlog4j.configuration=file:{self._log4j_path}",
            "-cp",
            f"{self.libs_dir}/*",
            main_class,
            *args,
        ]

    def _is_formatted(self) -> bool:
        return (self.log_dirs / "meta.properties").exists()

    def _format_storage(self) -> None:
        """Format the KRaft storage once; later starts reuse it (and its data)."""
        if self._is_formatted():
            return
        cmd = self._java_cmd(
            "kafka.tools.StorageTool",
            "format",
            "-t",
            _random_cluster_id(),
            "-c",
            str(self.config_path),
            "--ignore-formatted",
            jvm_opts=("-Xmx256m", "-XX:TieredStopAtLevel=1"),
        )
        with self.log_path.open("ab") as logf:
            logf.write(f"\n=== format: {' '.join(cmd)}\n".encode())
            logf.flush()
            rc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise BrokerError(
                f"kafka storage format failed (rc={rc}); log {self.log_path}:\n"
                f"{_tail(self.log_path)}"
            )

    # -------------------------------------------------------------- lifecycle
    def is_running(self) -> bool:
        """True while the broker JVM process is alive (not necessarily ready)."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 60) -> LocalBroker:
        """Start the broker and block until it answers metadata requests.

        Raises BrokerError (with the broker log tail) if the JVM exits early or
        the broker is not reachable within ``timeout`` seconds.
        """
        if self.is_running():
            return self
        self._cleanup_process()
        self.ensure_installed()
        self._write_config()
        self._format_storage()

        cmd = self._java_cmd("kafka.Kafka", str(self.config_path), jvm_opts=_JVM_OPTS)
        self._log_file = self.log_path.open("ab")
        self._log_file.write(f"\n=== start: {' '.join(cmd)}\n".encode())
        self._log_file.flush()
        t0 = time.monotonic()
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.data_dir,
            # Own process group: Ctrl-C in a terminal does not hit the JVM
            # directly; stop()/kill() signal the whole group.
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        with _LIVE_LOCK:
            _LIVE_BROKERS.add(self)
        try:
            self._wait_ready(t0 + timeout, timeout)
        except BaseException:
            self.kill()
            raise
        log.info(
            "kafka broker ready at %s in %.1fs (data %s)",
            self.bootstrap_servers,
            time.monotonic() - t0,
            self.data_dir,
        )
        return self

    def _wait_ready(self, deadline: float, timeout: float) -> None:
        admin: AdminClient | None = None
        last_error: object = "port not open"
        while True:
            if not self.is_running():
                rc = self._proc.returncode if self._proc else None
                raise BrokerError(
                    f"kafka broker exited during startup (rc={rc}); log {self.log_path}:\n"
                    f"{_tail(self.log_path)}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(
                    f"kafka broker not ready at {self.bootstrap_servers} after "
                    f"{timeout:.0f}s (last error: {last_error}); log {self.log_path}:\n"
                    f"{_tail(self.log_path)}"
                )
            if _port_open(self.port):
                if admin is None:
                    admin = AdminClient(
                        {
                            "bootstrap.servers": self.bootstrap_servers,
                            "logger": logging.getLogger(__name__ + ".librdkafka"),
                        }
                    )
                try:
                    md = admin.list_topics(timeout=min(2.0, max(remaining, 0.2)))
                    if md.brokers:
                        return
                    last_error = "metadata has no brokers"
                except KafkaException as exc:
                    last_error = exc
            time.sleep(_POLL_INTERVAL_S)

    def stop(self, timeout: float = 30) -> None:
        """Graceful shutdown (SIGTERM), escalating to SIGKILL after ``timeout``."""
        if self.is_running():
            assert self._proc is not None
            self._signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("kafka broker did not stop in %.0fs; killing it", timeout)
                self._signal(signal.SIGKILL)
                self._proc.wait()
        self._cleanup_process()

    def kill(self) -> None:
        """SIGKILL the broker immediately: simulates a crash (no clean shutdown)."""
        if self.is_running():
            assert self._proc is not None
            self._signal(signal.SIGKILL)
            self._proc.wait()
        self._cleanup_process()

    def restart(self, timeout: float = 60) -> LocalBroker:
        """Stop (if running) and start again with the same data dir and ports."""
        self.stop()
        return self.start(timeout=timeout)

    def _signal(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        try:
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:
            pass

    def _cleanup_process(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return  # still running; nothing to clean
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        with _LIVE_LOCK:
            _LIVE_BROKERS.discard(self)

    # -------------------------------------------------------- context manager
    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"LocalBroker({self.bootstrap_servers}, {state}, data_dir={self.data_dir})"


@atexit.register
def _stop_all_brokers() -> None:
    """Never leak a broker JVM when the Python process exits normally."""
    with _LIVE_LOCK:
        brokers = list(_LIVE_BROKERS)
    for broker in brokers:
        try:
            broker.stop(timeout=15)
        except Exception:  # pragma: no cover - best effort at exit
            broker.kill()
    for data_dir in _OWNED_DATA_DIRS:
        shutil.rmtree(data_dir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a broker in the foreground until Ctrl-C / SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m stream_detector.kafka.local_broker",
        description="Run a local single-node Kafka (KRaft) broker on 127.0.0.1.",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=REPO_ROOT / ".cache" / "kafka-data",
        help="broker data dir; kept across runs (default: %(default)s)",
    )
    parser.add_argument("--port", type=int, default=9092, help="client port (default: %(default)s)")
    parser.add_argument("--controller-port", type=int, default=None, help="KRaft controller port")
    parser.add_argument("--kafka-home", type=Path, default=None, help="dir with libs/ (Kafka jars)")
    parser.add_argument("--timeout", type=float, default=120, help="startup timeout in seconds")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    broker = LocalBroker(
        data_dir=args.data_dir,
        port=args.port,
        controller_port=args.controller_port,
        kafka_home=args.kafka_home,
    )
    stop_requested = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        stop_requested.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        broker.start(timeout=args.timeout)
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Kafka broker ready: bootstrap.servers={broker.bootstrap_servers}", flush=True)
    print(f"data dir: {broker.data_dir}  log: {broker.log_path}  (Ctrl-C to stop)", flush=True)
    try:
        while not stop_requested.wait(0.5):
            if not broker.is_running():
                print(
                    f"error: broker exited unexpectedly; log {broker.log_path}:\n"
                    f"{_tail(broker.log_path)}",
                    file=sys.stderr,
                )
                return 1
    finally:
        print("stopping broker ...", file=sys.stderr, flush=True)
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
