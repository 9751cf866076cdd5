"""Champion against challenger on live traffic (``trainer compare``) and the promotion gate
(``trainer retrain``).

While a challenger is set, the worker scores every batch with both models and publishes the
champion's alerts to the alerts topic and the challenger's to the shadow topic (same schema, its own
``model_version``). An *incident* here is what one model opened on one key: its ``open`` message and
the event-time span ``[first_event_timestamp, last_event_timestamp]`` of its latest message. Two
incidents of the two models *match* when they are on the same key and their spans overlap (each
widened by ``match_slack_s``): both models saw the same thing.

Operators give verdicts on the champion's incidents only (those are the ones they see). So:

- a champion incident marked ``false_positive`` that the challenger did not match is a false alarm
  the challenger would have spared them; one it matched, a false alarm it would have raised too;
- a champion incident marked ``true_positive`` that the challenger did not match is an anomaly the
  challenger would have missed;
- what the challenger opened that the champion did not is counted (``challenger_only``): nobody can
  say whether those were real, so the gate bounds them through the total alarm ratio.

The gate (:func:`gate`) promotes a challenger that has shadowed long enough, raised no more
incidents than ``max_alarm_ratio`` times the champion's (one when the champion raised none), missed
at most ``max_missed_true_positives`` of the champion's confirmed anomalies and, when the workers'
shadow counters were read, judged no larger share of windows over its threshold than
``max_over_ratio`` times the champion's share.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Iterable, Mapping

from stream_detector.feedback import FALSE_POSITIVE, TRUE_POSITIVE, Feedback


@dataclass
class Incident:
    """One model's incident on one key, as its alert messages describe it."""

    incident_id: str
    key: str
    model_version: str
    opened_at: float  # record time of the open message (epoch seconds); the compared period filters on it
    first_event_s: float
    last_event_s: float
    windows_over: int
    peak_severity: float
    closed: bool = False

    def overlaps(self, other: "Incident", slack_s: float) -> bool:
        return (self.key == other.key and self.first_event_s - slack_s <= other.last_event_s
                and other.first_event_s - slack_s <= self.last_event_s)


def _seconds(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def incidents_from_alerts(alerts: Iterable[tuple[float, Mapping[str, Any]]], model_version: str | None = None,
                          since: float | None = None) -> list[Incident]:
    """Incidents opened at or after ``since`` (record time) by ``model_version`` (any when None), from
    ``(record time, alert message)`` pairs in topic order. Later messages of an incident update its
    span and counts; messages not in the alert schema are skipped."""
    found: dict[str, Incident] = {}
    for at, alert in alerts:
        incident_id, state = alert.get("incident_id"), alert.get("state")
        body = alert.get("incident")
        if not isinstance(incident_id, str) or not isinstance(body, Mapping):
            continue
        if model_version is not None and alert.get("model_version") != model_version:
            continue
        first = _seconds(body.get("first_event_timestamp"))
        last = _seconds(body.get("last_event_timestamp"))
        if first is None or last is None:
            continue
        current = found.get(incident_id)
        if current is None:
            if state != "open" or (since is not None and at < since):
                continue  # opened before the compared period (or its open message was not read)
            current = found[incident_id] = Incident(incident_id, str(alert.get("key")), str(alert.get("model_version")),
                                                    at, first, last, 0, 0.0)
        current.last_event_s = max(current.last_event_s, last)
        current.windows_over = max(current.windows_over, int(body.get("windows_over") or 0))
        current.peak_severity = max(current.peak_severity, float(body.get("peak_severity") or 0.0))
        current.closed = current.closed or state == "close"
    return list(found.values())


@dataclass
class ModelCounts:
    version: str | None
    incidents: int = 0
    windows_over: int = 0
    keys: int = 0
    windows_judged: float | None = None  # from the workers' metrics, when given
    over_threshold_rate: float | None = None


@dataclass
class Comparison:
    """What ``trainer compare`` reports and the gate decides on."""

    since: float
    until: float
    champion: ModelCounts
    challenger: ModelCounts
    matched: int = 0
    champion_only: int = 0
    challenger_only: int = 0
    false_positives: int = 0  # champion incidents operators marked false_positive
    false_positives_avoided: int = 0  # ... the challenger did not raise
    true_positives: int = 0  # champion incidents operators marked true_positive
    true_positives_missed: int = 0  # ... the challenger did not raise
    agreement: dict[str, float] = field(default_factory=dict)  # from the workers' metrics, when given

    @property
    def shadow_seconds(self) -> float:
        return max(0.0, self.until - self.since)

    @property
    def alarm_ratio(self) -> float:
        """Challenger incidents per champion incident (0 and 0 read as 1: no change)."""
        if self.champion.incidents == 0:
            return 1.0 if self.challenger.incidents == 0 else float("inf")
        return self.challenger.incidents / self.champion.incidents

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["shadow_seconds"] = round(self.shadow_seconds, 3)
        ratio = self.alarm_ratio
        out["alarm_ratio"] = ratio if ratio != float("inf") else None
        return out


def compare(champion: list[Incident], challenger: list[Incident], verdicts: Mapping[str, Feedback],
            since: float, until: float, champion_version: str | None, challenger_version: str | None,
            match_slack_s: float = 0.0) -> Comparison:
    """Matches the two models' incidents and reads the verdicts on the champion's."""
    result = Comparison(since, until, _counts(champion_version, champion), _counts(challenger_version, challenger))
    by_key: dict[str, list[Incident]] = {}
    for inc in challenger:
        by_key.setdefault(inc.key, []).append(inc)
    matched_challenger: set[str] = set()
    for inc in champion:
        partners = [c for c in by_key.get(inc.key, ()) if inc.overlaps(c, match_slack_s)]
        matched_challenger.update(c.incident_id for c in partners)
        verdict = verdicts.get(inc.incident_id)
        if partners:
            result.matched += 1
        else:
            result.champion_only += 1
        if verdict is not None and verdict.verdict == FALSE_POSITIVE:
            result.false_positives += 1
            result.false_positives_avoided += 0 if partners else 1
        elif verdict is not None and verdict.verdict == TRUE_POSITIVE:
            result.true_positives += 1
            result.true_positives_missed += 0 if partners else 1
    result.challenger_only = sum(1 for c in challenger if c.incident_id not in matched_challenger)
    return result


def _counts(version: str | None, incidents: list[Incident]) -> ModelCounts:
    return ModelCounts(version, len(incidents), sum(i.windows_over for i in incidents), len({i.key for i in incidents}))


@dataclass(frozen=True)
class GateConfig:
    min_shadow_s: float = 3600.0
    max_alarm_ratio: float = 1.0
    max_missed_true_positives: int = 0
    min_challenger_windows: float = 0.0  # needs the workers' metrics when above 0
    max_over_ratio: float = 1.0  # with the workers' metrics: challenger's over-threshold rate per champion's


def gate(result: Comparison, config: GateConfig) -> tuple[bool, list[str]]:
    """Whether the challenger may be promoted, and every reason it may not (empty when it may)."""
    reasons = []
    if result.shadow_seconds < config.min_shadow_s:
        reasons.append(f"shadowed {result.shadow_seconds:.0f} s, the gate needs {config.min_shadow_s:.0f} s")
    allowed = config.max_alarm_ratio * result.champion.incidents + (1 if result.champion.incidents == 0 else 0)
    if result.challenger.incidents > allowed:
        reasons.append(f"the challenger opened {result.challenger.incidents} incidents, the champion "
                       f"{result.champion.incidents} (at most {config.max_alarm_ratio:g} times as many allowed)")
    if result.true_positives_missed > config.max_missed_true_positives:
        reasons.append(f"the challenger missed {result.true_positives_missed} of the champion's "
                       f"{result.true_positives} confirmed anomalies (true_positive verdicts)")
    if config.min_challenger_windows > 0:
        judged = result.challenger.windows_judged
        if judged is None:
            reasons.append("no worker metrics read (--metrics-url) to show the challenger judged "
                           f"{config.min_challenger_windows:g} windows")
        elif judged < config.min_challenger_windows:
            reasons.append(f"the challenger judged {judged:g} windows, the gate needs {config.min_challenger_windows:g}")
    over = (result.champion.over_threshold_rate, result.challenger.over_threshold_rate)
    if over[0] is not None and over[1] is not None and over[1] > config.max_over_ratio * over[0]:
        reasons.append(f"the challenger judged {100 * over[1]:.3f} % of windows over its threshold, the champion "
                       f"{100 * over[0]:.3f} % (at most {config.max_over_ratio:g} times as many allowed)")
    return not reasons, reasons


def apply_worker_metrics(result: Comparison, samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], float]) -> None:
    """Adds the workers' shadow counters (summed over the workers read) to the comparison: windows
    judged and over-threshold rate per model, and the agreement shares."""
    judged: dict[str, dict[str, float]] = {}
    agreement: dict[str, float] = {}
    for (name, labels), value in samples.items():
        label = dict(labels)
        if name == "stream_detector_shadow_windows_total":
            judged.setdefault(label.get("model", ""), {}).setdefault(label.get("outcome", ""), 0.0)
            judged[label.get("model", "")][label.get("outcome", "")] += value
        elif name == "stream_detector_shadow_agreement_total":
            agreement[label.get("agreement", "")] = agreement.get(label.get("agreement", ""), 0.0) + value
    for role, counts in (("champion", result.champion), ("challenger", result.challenger)):
        outcomes = judged.get(role)
        if outcomes:
            total = sum(outcomes.values())
            counts.windows_judged = total
            counts.over_threshold_rate = outcomes.get("over", 0.0) / total if total else None
    total = sum(agreement.values())
    result.agreement = {k: v / total for k, v in sorted(agreement.items())} if total else {}


def format_comparison(result: Comparison) -> str:
    """The report ``trainer compare`` prints."""
    def rate(counts: ModelCounts) -> str:
        if counts.over_threshold_rate is None:
            return "-"
        return f"{100 * counts.over_threshold_rate:.3f} % of {counts.windows_judged:.0f} windows"

    hours = result.shadow_seconds / 3600.0
    w = max(16, len(str(result.champion.version)), len(str(result.challenger.version)), len(rate(result.champion)),
            len(rate(result.challenger)))

    def row(name: str, a: object, b: object) -> str:
        return f"{name:24s} {str(a):>{w}s} {str(b):>{w}s}"

    per_hour = [f"{c.incidents / hours:.2f}" if hours else "-" for c in (result.champion, result.challenger)]
    lines = [f"shadow period: {result.shadow_seconds:.0f} s",
             row("", "champion", "challenger"),
             row("version", result.champion.version, result.challenger.version),
             row("incidents opened", result.champion.incidents, result.challenger.incidents),
             row("incidents per hour", *per_hour),
             row("windows over threshold", result.champion.windows_over, result.challenger.windows_over),
             row("keys alerted", result.champion.keys, result.challenger.keys),
             row("over-threshold rate", rate(result.champion), rate(result.challenger)),
             f"incidents both raised: {result.matched}; champion only: {result.champion_only}; "
             f"challenger only: {result.challenger_only}",
             f"verdicts on the champion's incidents: {result.false_positives} false_positive "
             f"({result.false_positives_avoided} the challenger would have spared), {result.true_positives} "
             f"true_positive ({result.true_positives_missed} the challenger would have missed)"]
    if result.agreement:
        lines.append("window agreement (workers' metrics, since they started): " +
                     ", ".join(f"{k} {100 * v:.2f} %" for k, v in result.agreement.items()))

    def compared(a: float, b: float, fewer: str, more: str, same: str) -> str:
        return fewer if b < a else more if b > a else same

    verdict = "the challenger would have opened " + compared(result.champion.incidents, result.challenger.incidents,
                                                             "fewer incidents", "more incidents", "as many incidents")
    rates = (result.champion.over_threshold_rate, result.challenger.over_threshold_rate)
    if rates[0] is not None and rates[1] is not None:
        verdict += ", judged " + compared(rates[0], rates[1], "a smaller", "a larger", "the same") + \
            " share of windows over threshold"
    verdict += (f" and missed {result.true_positives_missed} confirmed anomalies" if result.true_positives_missed
                else " and missed no confirmed anomaly")
    lines.append(verdict)
    return "\n".join(lines)
