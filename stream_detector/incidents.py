"""Alert lifecycle: over-threshold windows of a key grouped into incidents (open, update, close).

A threshold says which *windows* look anomalous; a subscriber wants one alert thread per
*incident*. Per key:

- an incident opens once ``min_windows`` consecutive windows are over their threshold (a shorter
  run is a suppressed blip: counted, never published);
- while it is open, over-threshold windows are collected and published in rate-limited updates:
  one as soon as the peak severity grows by ``update_growth`` over the last published one, and at
  least one every ``update_every`` new over-threshold windows;
- it closes after ``close_after`` consecutive windows at or below threshold (``recovered``), when
  the key has had no scored window for ``idle_close_s`` or ``idle_close_gaps`` of its own typical
  event-time gaps, whichever is longer (``idle``: a key sampled hourly is not idle after ten
  minutes of silence), when the key's window is
  dropped (``evicted``) or its partition handed to another worker (``revoked``, only where the
  key's state is not persisted; with the worker's changelog the incident is handed over instead),
  or when an operator marks it an ``expected_change`` (``acknowledged``, see :mod:`~stream_detector.feedback`).
  A window over threshold during the closing streak keeps the incident open.

Every message lists in ``event_ids`` the over-threshold windows it is the first to report, so the
union over an incident's messages is exactly its over-threshold windows, each reported once; the
close message carries those not yet published and a summary of the incident. Identifiers are
deterministic: ``incident_id`` from the key and the incident's first event id, ``alert_id`` from
the key, the newest over-threshold event and the state, so a replay of the same events yields the
same ids and a subscriber drops duplicates by id.

State is kept only for keys with an incident or a run of over-threshold windows in progress:
nothing per key otherwise.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping

from .alerts import build_incident_alert, incident_id as make_incident_id

OPEN, UPDATE, CLOSE = "open", "update", "close"
STATES = (OPEN, UPDATE, CLOSE)
RECOVERED, IDLE, EVICTED, REVOKED, STOPPED = "recovered", "idle", "evicted", "revoked", "stopped"
ACKNOWLEDGED = "acknowledged"  # an operator's `expected_change` verdict (stream_detector.feedback)
CLOSE_REASONS = (RECOVERED, IDLE, EVICTED, REVOKED, STOPPED, ACKNOWLEDGED)


@dataclass(frozen=True)
class AlertPolicy:
    """When over-threshold windows become published alert messages (see the module docstring)."""

    min_windows: int = 2
    open_severity: float = 2.0  # a window this far over its threshold opens an incident at once
    close_after: int = 8
    update_every: int = 16
    update_growth: float = 1.5
    idle_close_s: float = 600.0
    idle_close_gaps: float = 4.0  # ... or this many of the key's typical inter-event gaps, if longer

    @classmethod
    def from_settings(cls, settings: Any) -> "AlertPolicy":
        return cls(min_windows=settings.alert_min_windows, open_severity=settings.alert_open_severity,
                   close_after=settings.alert_close_after, update_every=settings.alert_update_every,
                   update_growth=settings.alert_update_growth, idle_close_s=settings.incident_idle_close_s)

    def __post_init__(self) -> None:
        if self.min_windows < 1 or self.close_after < 1 or self.update_every < 1:
            raise ValueError("min_windows, close_after and update_every must be at least 1")
        if not self.open_severity >= 1.0:
            raise ValueError("open_severity must be at least 1")
        if not self.update_growth >= 1.0:
            raise ValueError("update_growth must be at least 1")
        if not self.idle_close_s > 0:
            raise ValueError("idle_close_s must be positive")
        if not self.idle_close_gaps >= 0:
            raise ValueError("idle_close_gaps must not be negative")


@dataclass(slots=True)
class WindowInfo:
    """What the tracker needs to know about one scored window of a key."""

    event_id: str
    timestamp: float
    score: float
    threshold: float
    top_features: tuple[tuple[str, float], ...]  # (feature, error), largest first


@dataclass(slots=True)
class Incident:
    key: str
    first_event_id: str
    first_timestamp: float
    last: WindowInfo  # newest over-threshold window
    peak: WindowInfo  # highest severity so far
    windows_over: int = 1
    windows_total: int = 1  # scored windows from the first over-threshold one on, gaps included
    below_streak: int = 0
    opened: bool = False
    sequence: int = 0  # messages published so far
    pending: list[str] = field(default_factory=list)  # over-threshold event ids not published yet
    published_peak: float | None = None  # peak severity as of the last message
    last_seen: float = 0.0  # wall clock of the key's last scored window
    idle_after: float = 0.0  # silence (s) after which it closes as idle: the policy's, or the key's cadence

    @property
    def id(self) -> str:
        return make_incident_id(self.key, self.first_event_id)


def _info_data(info: WindowInfo) -> list[Any]:
    return [info.event_id, info.timestamp, info.score, info.threshold, [list(f) for f in info.top_features]]


def _info_from(data: list[Any]) -> WindowInfo:
    event_id, timestamp, score, threshold, top = data
    return WindowInfo(str(event_id), float(timestamp), float(score), float(threshold),
                      tuple((str(name), float(error)) for name, error in top))


def severity(score: float, threshold: float) -> float | None:
    """Score in units of the key's threshold: 1 is the threshold, 2 twice over it."""
    return float(score / threshold) if threshold > 0 else None


def _higher(a: WindowInfo, b: WindowInfo) -> bool:
    """Whether window a is more anomalous than b: by severity, by score where a threshold is not positive."""
    sa, sb = severity(a.score, a.threshold), severity(b.score, b.threshold)
    return sa > sb if sa is not None and sb is not None else a.score > b.score


@dataclass
class IncidentStats:
    windows_over: int = 0
    opened: int = 0
    updates: int = 0
    closed: Counter = field(default_factory=Counter)
    suppressed: int = 0  # over-threshold runs shorter than min_windows (never published)


class IncidentTracker:
    """Per-key incident state machine; returns the alert messages to publish, in order."""

    def __init__(self, policy: AlertPolicy | None = None):
        self.policy = policy or AlertPolicy()
        self.stats = IncidentStats()
        self._incidents: OrderedDict[str, Incident] = OrderedDict()  # least recently active first
        self._open = 0

    def __len__(self) -> int:
        return len(self._incidents)

    def __contains__(self, key: str) -> bool:
        return key in self._incidents

    @property
    def tracking(self) -> Mapping[str, Incident]:
        """The keys with an incident, open or pending (for membership tests; not to be modified)."""
        return self._incidents

    def get(self, key: str) -> Incident | None:
        return self._incidents.get(key)

    @property
    def open_count(self) -> int:
        """Incidents that have been opened (published) and not closed yet."""
        return self._open

    def idle_after(self, gap_s: float = -1.0) -> float:
        """How long a key whose events come every ``gap_s`` seconds (event time; negative when not
        known yet) may be silent before its incident closes as idle."""
        return max(self.policy.idle_close_s, self.policy.idle_close_gaps * gap_s)

    def observe(self, key: str, over: bool, info: WindowInfo | None, now: float,
                context: dict[str, Any], gap_s: float = -1.0, calm: bool = True) -> dict[str, Any] | None:
        """One scored window of ``key``; ``info`` is needed when ``over`` (else may be None);
        ``gap_s`` is the key's typical inter-event gap in event time (negative when not known);
        ``calm``: a window not over its threshold counts towards closing an open incident only when
        calm (a threshold policy with hysteresis says a window just under the threshold is not).

        Returns the message this window triggers (open, update or close), if any.
        """
        inc = self._incidents.get(key)
        if inc is None:
            if not over:
                return None  # the common case: nothing going on for this key
            assert info is not None
            self.stats.windows_over += 1
            inc = Incident(key, info.event_id, info.timestamp, info, info, pending=[info.event_id], last_seen=now,
                           idle_after=self.idle_after(gap_s))
            self._incidents[key] = inc
            return self._maybe_open(inc, context)
        self._incidents.move_to_end(key)
        inc.last_seen = now
        inc.idle_after = self.idle_after(gap_s)
        inc.windows_total += 1
        if not over:
            if not inc.opened:  # a blip shorter than min_windows
                del self._incidents[key]
                self.stats.suppressed += 1
                return None
            if not calm:  # under the threshold, not clearly back to normal: the incident stays open
                inc.below_streak = 0
                return None
            inc.below_streak += 1
            if inc.below_streak >= self.policy.close_after:
                return self._close(inc, RECOVERED, context)
            return None
        assert info is not None
        self.stats.windows_over += 1
        inc.below_streak = 0
        inc.windows_over += 1
        inc.last = info
        if _higher(info, inc.peak):
            inc.peak = info
        inc.pending.append(info.event_id)
        if not inc.opened:
            return self._maybe_open(inc, context)
        peak = severity(inc.peak.score, inc.peak.threshold)
        if (len(inc.pending) >= self.policy.update_every
                or (peak is not None and inc.published_peak is not None
                    and peak >= inc.published_peak * self.policy.update_growth)):
            self.stats.updates += 1
            return self._message(inc, UPDATE, context)
        return None

    def export_key(self, key: str) -> dict[str, Any] | None:
        """The key's incident state as plain data (for its changelog snapshot); None when it has none.

        Persisted with the key's window, so a restarted worker goes on with the same incident: its
        over-threshold windows not published yet are still published (their events are acked
        already), and no second incident opens under a new id.
        """
        inc = self._incidents.get(key)
        if inc is None:
            return None
        return {"first_event_id": inc.first_event_id, "first_timestamp": inc.first_timestamp,
                "last": _info_data(inc.last), "peak": _info_data(inc.peak), "windows_over": inc.windows_over,
                "windows_total": inc.windows_total, "below_streak": inc.below_streak, "opened": inc.opened,
                "sequence": inc.sequence, "pending": list(inc.pending), "published_peak": inc.published_peak,
                "idle_after": inc.idle_after}

    def adopt_key(self, key: str, data: dict[str, Any], now: float) -> None:
        """Takes over an incident from :meth:`export_key` (a restored key); raises ValueError if malformed."""
        try:
            inc = Incident(key, str(data["first_event_id"]), float(data["first_timestamp"]),
                           _info_from(data["last"]), _info_from(data["peak"]),
                           windows_over=int(data["windows_over"]), windows_total=int(data["windows_total"]),
                           below_streak=int(data["below_streak"]), opened=bool(data["opened"]),
                           sequence=int(data["sequence"]), pending=[str(i) for i in data["pending"]],
                           published_peak=None if data["published_peak"] is None else float(data["published_peak"]),
                           last_seen=now, idle_after=float(data.get("idle_after", self.policy.idle_close_s)))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ValueError(f"incident state not understood: {exc!r}") from exc
        old = self._incidents.pop(key, None)
        if old is not None and old.opened:
            self._open -= 1
        self._incidents[key] = inc  # most recently active: its idle clock restarts now
        if inc.opened:
            self._open += 1

    def sweep_idle(self, now: float, context: dict[str, Any]) -> list[dict[str, Any]]:
        """Closes incidents whose key has been silent for its ``idle_after`` (at least ``idle_close_s``).

        Incidents are kept least recently active first, so the walk stops at the first one silent for
        less than ``idle_close_s``; the few slow keys before it are checked against their own limit.
        """
        out = []
        limit = now - self.policy.idle_close_s
        idle = []
        for key, inc in self._incidents.items():
            if inc.last_seen > limit:
                break
            if now - inc.last_seen >= inc.idle_after:
                idle.append(key)
        for key in idle:
            msg = self.drop(key, IDLE, context)
            if msg is not None:
                out.append(msg)
        return out

    def drop(self, key: str, reason: str, context: dict[str, Any]) -> dict[str, Any] | None:
        """Forgets the key's incident state (key evicted, idle, revoked); the close message if one was open."""
        inc = self._incidents.get(key)
        if inc is None:
            return None
        if not inc.opened:
            del self._incidents[key]
            self.stats.suppressed += 1
            return None
        return self._close(inc, reason, context)

    def forget(self, key: str) -> None:
        """Drops the key's incident state without a message: another worker goes on with it."""
        inc = self._incidents.pop(key, None)
        if inc is not None and inc.opened:
            self._open -= 1

    def close_all(self, reason: str, context: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        for key in list(self._incidents):
            msg = self.drop(key, reason, context)
            if msg is not None:
                out.append(msg)
        return out

    def _maybe_open(self, inc: Incident, context: dict[str, Any]) -> dict[str, Any] | None:
        if inc.windows_over < self.policy.min_windows:
            peak = severity(inc.peak.score, inc.peak.threshold)
            if peak is None or peak < self.policy.open_severity:
                return None
        inc.opened = True
        self._open += 1
        self.stats.opened += 1
        return self._message(inc, OPEN, context)

    def _close(self, inc: Incident, reason: str, context: dict[str, Any]) -> dict[str, Any]:
        del self._incidents[inc.key]
        self._open -= 1
        self.stats.closed[reason] += 1
        return self._message(inc, CLOSE, context, reason)

    def _message(self, inc: Incident, state: str, context: dict[str, Any],
                 close_reason: str | None = None) -> dict[str, Any]:
        event_ids, inc.pending = inc.pending, []
        inc.published_peak = severity(inc.peak.score, inc.peak.threshold)
        msg = build_incident_alert(
            key=inc.key, incident_id=inc.id, state=state, sequence=inc.sequence, event_ids=event_ids,
            event_id=inc.last.event_id, event_timestamp=inc.last.timestamp, score=inc.last.score,
            threshold=inc.last.threshold, top_features=inc.last.top_features,
            incident={
                "first_event_id": inc.first_event_id,
                "first_event_timestamp": inc.first_timestamp,
                "last_event_id": inc.last.event_id,
                "last_event_timestamp": inc.last.timestamp,
                "windows_over": inc.windows_over,
                "windows_total": inc.windows_total,
                "peak_event_id": inc.peak.event_id,
                "peak_score": inc.peak.score,
                "peak_severity": severity(inc.peak.score, inc.peak.threshold),
                "duration_s": max(inc.last.timestamp - inc.first_timestamp, 0.0),
                "close_reason": close_reason,
            },
            **context,
        )
        inc.sequence += 1
        return msg
