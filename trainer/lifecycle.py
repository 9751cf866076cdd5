"""``trainer compare`` and ``trainer retrain``: the challenger's record on live traffic, and a
retraining loop a cron job (or a Kubernetes CronJob) can run unattended.

``trainer retrain`` is idempotent per run and keeps its state in the model directory's aliases:

1. **No challenger set**: trains a candidate on the input topic's recent history with the
   champion's own recipe (its training configuration and features, read from its metadata), leaving
   out the events the served model alerted on and relabelling events from operators' verdicts
   (false positives become normal data), and sets it as the challenger. The worker shadows it from
   its next model poll.
2. **A challenger set for less than ``--min-shadow-s``**: waits (exit 0, nothing changes).
3. **A challenger that has shadowed long enough**: compares it with the champion on the traffic
   since it was set (:mod:`trainer.compare`) and promotes it when the gate passes (the worker swaps
   without a restart), or retires it (the ``challenger`` alias is removed; exit 3) when it does not.
"""

from __future__ import annotations

import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

from stream_detector.artifacts import ArtifactError, load_artifact
from stream_detector.registry import CHALLENGER, CHAMPION, read_aliases, remove_alias, set_alias
from stream_detector.settings import Settings

from .compare import Comparison, GateConfig, apply_worker_metrics, compare, gate, incidents_from_alerts
from .topic import read_json_records, read_verdicts, topic_exists

GATE_FAILED = 3  # exit status of `trainer retrain` when the gate retires the challenger


def alias_set_at(model_dir: str | Path, alias: str) -> float | None:
    """When ``alias`` was last pointed at its current version (epoch seconds), from the history."""
    data = read_aliases(model_dir)
    current = data["aliases"].get(alias)
    if current is None:
        return None
    for entry in reversed(data["history"]):
        if entry.get("alias") == alias and entry.get("version") == current:
            try:
                return datetime.fromisoformat(str(entry.get("at"))).timestamp()
            except ValueError:
                return None
    return None


def shadow_topic_name(settings: Settings) -> str:
    """The topic the worker publishes the challenger's alerts to."""
    named = getattr(settings, "shadow_topic_name", None)
    if callable(named):
        named = named()
    return named if isinstance(named, str) and named else f"{settings.alerts_topic}.shadow"


def scrape_metrics(urls: list[str], timeout_s: float = 10.0) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of the workers' ``/metrics`` pages, summed over the workers by name and labels."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for url in urls:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (an operator's URL)
            text = response.read().decode("utf-8")
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                totals[key] = totals.get(key, 0.0) + float(sample.value)
    return totals


@dataclass
class CompareInputs:
    settings: Settings
    client_config: dict[str, Any]
    timeout_s: float = 30.0
    metrics_urls: tuple[str, ...] = ()
    match_slack_s: float = 0.0


def compare_live(model_dir: str | Path, inputs: CompareInputs, since: float | None = None,
                 now: float | None = None) -> Comparison:
    """The champion against the challenger on the traffic since the challenger was set (or ``since``)."""
    aliases = read_aliases(model_dir)["aliases"]
    champion, challenger = aliases.get(CHAMPION), aliases.get(CHALLENGER)
    if challenger is None:
        raise ArtifactError(f"{model_dir}: no challenger set (`trainer promote VERSION --alias challenger`)")
    start = since if since is not None else alias_set_at(model_dir, CHALLENGER)
    if start is None:
        raise ArtifactError(f"{model_dir}: the aliases history does not say when the challenger was set; give --since")
    settings, bootstrap = inputs.settings, inputs.settings.bootstrap_servers
    alerts, _ = read_json_records(bootstrap, settings.alerts_topic, start, inputs.client_config, inputs.timeout_s)
    shadow_topic = shadow_topic_name(settings)
    shadow: list = []
    if topic_exists(bootstrap, shadow_topic, inputs.client_config, inputs.timeout_s):
        shadow, _ = read_json_records(bootstrap, shadow_topic, start, inputs.client_config, inputs.timeout_s)
    verdicts, _ = read_verdicts(bootstrap, settings.feedback_topic_name, inputs.client_config, inputs.timeout_s)
    result = compare(incidents_from_alerts(alerts, champion, start), incidents_from_alerts(shadow, challenger, start),
                     verdicts, start, time.time() if now is None else now, champion, challenger, inputs.match_slack_s)
    if inputs.metrics_urls:
        apply_worker_metrics(result, scrape_metrics(list(inputs.metrics_urls)))
    return result


def decide(model_dir: str | Path, result: Comparison, config: GateConfig,
           signing_key: bytes | None = None) -> tuple[str, list[str]]:
    """Applies the gate: ``promoted`` (the challenger is the champion now), ``waiting`` (not shadowed
    long enough yet) or ``retired`` (the challenger alias removed), with the gate's reasons."""
    passed, reasons = gate(result, config)
    if passed:
        version = result.challenger.version
        assert version is not None
        set_alias(model_dir, CHAMPION, version, check=lambda p: load_artifact(p, signing_key=signing_key))
        remove_alias(model_dir, CHALLENGER, reason="promoted")
        return "promoted", []
    if result.shadow_seconds < config.min_shadow_s:
        return "waiting", reasons
    remove_alias(model_dir, CHALLENGER, reason="gate failed: " + "; ".join(reasons))
    return "retired", reasons


def champion_recipe(model_dir: str | Path, signing_key: bytes | None = None) -> tuple[Any, Mapping[str, Any]]:
    """The champion's profile and training configuration, the recipe a retrained candidate follows."""
    aliases = read_aliases(model_dir)["aliases"]
    version = aliases.get(CHAMPION)
    if version is None:
        raise ArtifactError(f"{model_dir}: no champion to retrain (train one with `trainer train` first)")
    artifact = load_artifact(Path(model_dir) / version, signing_key=signing_key)
    config = dict((artifact.metadata.get("training") or {}).get("config") or {})
    if not config:
        raise ArtifactError(f"{model_dir}/{version}: its metadata has no training configuration to follow")
    return artifact.profile, config
