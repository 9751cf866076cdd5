"""The one settings object: defaults, then a TOML file, then environment variables.

Every field can be set in a TOML file (``STREAM_DETECTOR_CONFIG=path`` or ``--config``) and by an
environment variable named ``STREAM_DETECTOR_<FIELD>`` in upper case. The README's settings table
is generated from the field metadata below, so the documentation cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

ENV_PREFIX = "STREAM_DETECTOR_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass(frozen=True)
class Settings:
    """Worker configuration. Secrets are never printed: see :meth:`redacted`."""

    bootstrap_servers: str = field(default="127.0.0.1:9092", metadata=_doc("Kafka bootstrap servers, comma-separated."))
    input_topic: str = field(default="events", metadata=_doc("Topic the worker consumes events from."))
    alerts_topic: str = field(default="alerts", metadata=_doc("Topic alerts are published to, keyed by event key."))
    dead_letter_topic: str = field(
        default="events.dlq", metadata=_doc("Topic invalid events go to, with their original bytes and the reason.")
    )
    consumer_group: str = field(default="stream-detector", metadata=_doc("Kafka consumer group (Faust app id)."))
    auto_offset_reset: str = field(
        default="earliest", metadata=_doc("Where a new consumer group starts: `earliest` or `latest`.")
    )
    model_dir: str = field(
        default="artifacts/model",
        metadata=_doc("Model artifact directory, or a directory of versions (the newest is served)."),
    )
    device: str = field(default="auto", metadata=_doc("`auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`."))
    torch_threads: int = field(default=0, metadata=_doc("Intra-op threads for CPU inference; 0 = number of cores."))
    batch_max: int = field(default=1024, metadata=_doc("Most events gathered into one micro-batch."))
    batch_within_s: float = field(
        default=0.02, metadata=_doc("Longest wait for a micro-batch to fill before it is scored anyway.")
    )
    key_field: str = field(
        default="",
        metadata=_doc("Window key taken from this event field (e.g. `terminal_id`) instead of the event `key`."),
    )
    max_keys: int = field(
        default=100_000, metadata=_doc("Most keys with a live window; the least recently seen is evicted beyond it.")
    )
    key_ttl_s: float = field(
        default=86_400.0, metadata=_doc("A key idle this long (wall clock) loses its window.")
    )
    max_message_bytes: int = field(
        default=1_000_000, metadata=_doc("Larger messages are dead-lettered with reason `oversized`.")
    )
    threshold: float | None = field(
        default=None, metadata=_doc("Overrides the artifact's alert threshold when set.")
    )
    top_features: int = field(default=3, metadata=_doc("Contributing features listed in each alert."))
    metrics_host: str = field(default="127.0.0.1", metadata=_doc("Address the Prometheus metrics endpoint binds to."))
    metrics_port: int = field(default=9108, metadata=_doc("Port of the Prometheus metrics endpoint; 0 disables it."))
    log_level: str = field(default="info", metadata=_doc("`debug`, `info`, `warning` or `error`."))

    def __post_init__(self) -> None:
        problems = []
        if self.auto_offset_reset not in ("earliest", "latest"):
            problems.append(f"auto_offset_reset must be earliest or latest, not {self.auto_offset_reset!r}")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            problems.append(f"log_level must be debug, info, warning or error, not {self.log_level!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            problems.append(f"device must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        for name in ("batch_max", "max_keys", "max_message_bytes"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        for name in ("torch_threads", "top_features", "metrics_port"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative")
        if self.batch_within_s <= 0 or self.key_ttl_s <= 0:
            problems.append("batch_within_s and key_ttl_s must be positive")
        if problems:
            raise ValueError("invalid settings: " + "; ".join(problems))

    @classmethod
    def load(
        cls,
        config_file: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> "Settings":
        """Builds settings with precedence: overrides > environment > file > defaults."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        path = config_file or env.get(CONFIG_ENV)
        if path:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
            data = data.get("stream_detector", data)
            values.update(_check_names(cls, data, source=str(path)))
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = raw
        if overrides:
            values.update({k: v for k, v in _check_names(cls, overrides, source="overrides").items() if v is not None})
        return cls(**{name: _coerce(cls, name, value) for name, value in values.items()})

    def with_changes(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    def redacted(self) -> dict[str, Any]:
        """A dict safe to log: anything that looks like a secret is masked."""
        out = dataclasses.asdict(self)
        for name in out:
            if any(word in name for word in ("password", "secret", "token")):
                out[name] = "***" if out[name] else out[name]
        return out

    @property
    def model_path(self) -> Path:
        return Path(self.model_dir)


def _check_names(cls: type, data: Mapping[str, Any], source: str) -> dict[str, Any]:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown setting(s) in {source}: {', '.join(unknown)}")
    return dict(data)


def _coerce(cls: type, name: str, value: Any) -> Any:
    default = next(f.default for f in fields(cls) if f.name == name)
    if value is None:
        return None
    try:
        if name == "threshold":
            return None if value in ("", "none", "None") else float(value)
        if isinstance(default, bool):
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("not a whole number")
            return int(value)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"setting {name}: cannot read {value!r}: {exc}") from None


def settings_table() -> str:
    """Markdown table of every setting, for the README."""
    rows = ["| setting | environment variable | default | meaning |", "| --- | --- | --- | --- |"]
    for f in fields(Settings):
        default = "unset" if f.default is None else ("empty" if f.default == "" else f"`{f.default}`")
        rows.append(f"| `{f.name}` | `{ENV_PREFIX}{f.name.upper()}` | {default} | {f.metadata.get('doc', '')} |")
    return "\n".join(rows)
