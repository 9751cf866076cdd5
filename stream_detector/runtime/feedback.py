"""The worker's side of the feedback topic (see :mod:`stream_detector.feedback`).

Each message is one operator's verdict on an incident: counted by verdict; an ``expected_change``
for an incident open on this worker closes it (reason ``acknowledged``: the close message goes to
the alerts topic at once, not with the next micro-batch) and restarts the key's threshold warm-up.
A message that is not a valid verdict is counted, logged (rate-limited) and dead-lettered with
reason ``invalid_feedback``; nothing in it can stop the worker.

Runs on the event loop between micro-batches, like the batch pipeline, so the detector's state is
never changed under a batch being judged. Knows nothing of Faust: it takes records.
"""

from __future__ import annotations

import logging

from ..alerts import encode_alert
from ..detector import Detector, RawRecord
from ..feedback import EXPECTED_CHANGE, INVALID_FEEDBACK, InvalidFeedback, parse_feedback
from ..kafka.output import OutputProducer
from ..logs import RateLimitedLog
from ..metrics import WorkerMetrics
from .dead_letters import dead_letter

log = logging.getLogger("stream_detector.worker")


class FeedbackHandler:
    def __init__(self, detector: Detector, metrics: WorkerMetrics, out: OutputProducer, feedback_topic: str,
                 alerts_topic: str, dead_letter_topic: str, invalid_log_interval_s: float = 10.0):
        self.detector = detector
        self.metrics = metrics
        self.out = out
        self.feedback_topic = feedback_topic
        self.alerts_topic = alerts_topic
        self.dead_letter_topic = dead_letter_topic
        self.invalid_log = RateLimitedLog(log, invalid_log_interval_s)

    async def handle(self, record: RawRecord) -> None:
        """One feedback message: counted, acted on, or dead-lettered."""
        metrics = self.metrics
        try:
            feedback = parse_feedback(record.value, record.key)
        except InvalidFeedback as exc:
            metrics.feedback_invalid.inc()
            source = f"{self.feedback_topic}:{record.partition}:{record.offset}"
            self.invalid_log.log(INVALID_FEEDBACK, "invalid feedback at %s: %s", source, exc)
            letter = dead_letter(record.value, record.key, record.headers, INVALID_FEEDBACK, str(exc), source,
                                 self.out.max_message_bytes)
            if letter.truncated:
                metrics.dead_letters_truncated.inc()
            sent = self.out.group()
            sent.send(self.dead_letter_topic, letter.key, letter.value, headers=letter.headers)
            await sent.wait()
            metrics.dead_lettered.inc()
            return
        metrics.feedback.labels(verdict=feedback.verdict).inc()
        if feedback.verdict != EXPECTED_CHANGE:
            return
        message = self.detector.acknowledge(feedback.key, feedback.incident_id)
        if message is None:
            log.info("expected_change for incident %s of key %r: not open here, nothing to close",
                     feedback.incident_id, feedback.key)
            return
        sent = self.out.group()
        sent.send(self.alerts_topic, message["key"].encode(), encode_alert(message))
        await sent.wait()
        metrics.alerts_published.inc()
        metrics.alert_messages.labels(state="close").inc()
        metrics.incidents_closed.labels(reason=message["incident"]["close_reason"]).inc()
        metrics.incidents_open.set(self.detector.incidents.open_count)
        log.info("incident %s of key %r closed as acknowledged (expected change%s); its threshold warms up again",
                 feedback.incident_id, feedback.key, f" by {feedback.by}" if feedback.by else "")
