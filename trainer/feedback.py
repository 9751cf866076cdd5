"""Operators' verdicts as training labels (``trainer train --feedback-jsonl --alerts-jsonl``).

A verdict names an incident; the incident's events are the union of ``event_ids`` over its alert
messages (a dump of the alerts topic). The events of a ``true_positive`` incident are labelled
anomalous (left out of unsupervised training, positives for a supervised model); those of a
``false_positive`` incident are labelled normal (kept as normal training data, whatever the data's
own label said). ``expected_change`` verdicts change no label.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import orjson

from stream_detector.feedback import FALSE_POSITIVE, TRUE_POSITIVE, Feedback


def incident_events(alerts: Iterable[Mapping[str, Any]]) -> dict[str, set[str]]:
    """incident_id -> every event id its alert messages reported."""
    out: dict[str, set[str]] = {}
    for alert in alerts:
        incident = alert.get("incident_id")
        if isinstance(incident, str):
            out.setdefault(incident, set()).update(str(e) for e in alert.get("event_ids") or ())
    return out


def read_alerts_jsonl(path: str) -> list[dict[str, Any]]:
    """Alert messages from a JSON-lines dump of the alerts topic (blank lines skipped)."""
    with open(path, "rb") as fh:
        return [orjson.loads(line) for line in fh if line.strip()]


def apply_verdicts(event_ids: Sequence[str], labels: Sequence[int], verdicts: Mapping[str, Feedback],
                   alerts: Iterable[Mapping[str, Any]]) -> tuple[list[int], Counter]:
    """The labels with the verdicts applied, and how many events each verdict relabelled."""
    events = incident_events(alerts)
    anomalous: set[str] = set()
    normal: set[str] = set()
    for incident, feedback in verdicts.items():
        if feedback.verdict == TRUE_POSITIVE:
            anomalous |= events.get(incident, set())
        elif feedback.verdict == FALSE_POSITIVE:
            normal |= events.get(incident, set())
    out, counts = [], Counter()
    for event_id, label in zip(event_ids, labels):
        if event_id in anomalous:
            out.append(1)
            counts[TRUE_POSITIVE] += 1
        elif event_id in normal:
            out.append(0)
            counts[FALSE_POSITIVE] += 1
        else:
            out.append(int(label))
    return out, counts


def unreviewed_events(alerts: Iterable[Mapping[str, Any]], verdicts: Mapping[str, Feedback]) -> set[str]:
    """Events of incidents with no true_positive or false_positive verdict: alerted on, but nobody
    said whether rightly, so an evaluation by verdicts leaves them out."""
    reviewed = {i for i, f in verdicts.items() if f.verdict in (TRUE_POSITIVE, FALSE_POSITIVE)}
    out: set[str] = set()
    for incident, events in incident_events(alerts).items():
        if incident not in reviewed:
            out |= events
    return out
