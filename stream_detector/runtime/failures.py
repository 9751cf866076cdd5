"""What the worker does when a micro-batch cannot be finished: stop, so the group redelivers it.

Failures of one message (decoding, windowing, a non-finite score) never get here: that message is
dead-lettered and the batch goes on. A batch-level failure (the model raises, CUDA runs out of
memory, the broker refuses or times out a delivery after librdkafka's retries, a bug in judging
or acking) leaves the batch's events unjudged or their alerts unacknowledged. Acking a later
batch would let Faust commit past them, and restarting the agent inside the process (Faust's
supervisor does that for an agent that raises) would go on consuming after a gap. So:

- the model call is retried (``MODEL_ATTEMPTS`` in all: a CUDA out-of-memory may pass);
- any other failure, or the model's last attempt, stops the process at once with exit status
  :data:`EXIT_BATCH_FAILED`, without a clean shutdown (as after ``kill -9``): nothing after the
  failed batch is acked, so nothing after it is committed, and the consumer group redelivers
  from the last commit to a restarted worker (or to another member). Alerts redelivered that way
  carry the same ``alert_id``.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

from ..errors import BatchFailed

log = logging.getLogger("stream_detector.worker")

EXIT_BATCH_FAILED = 70  # EX_SOFTWARE
MODEL_ATTEMPTS = 3


def _hard_exit(status: int) -> None:
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # a broken handler must not keep the process alive
            pass
    os._exit(status)


class FailurePolicy:
    """Stops the worker on the first batch-level failure (see the module docstring).

    ``exit`` is :func:`os._exit` after flushing the logs; tests pass one that raises instead.
    """

    def __init__(self, exit: Callable[[int], None] = _hard_exit, on_failure: Callable[[str], None] | None = None):
        self._exit = exit
        self._on_failure = on_failure  # e.g. a metric, counted before the process stops
        self.failure: BatchFailed | None = None

    @property
    def failed(self) -> bool:
        return self.failure is not None

    def fail(self, stage: str, exc: BaseException) -> BatchFailed:
        """Records the failure, logs it, and stops the process (returns only if ``exit`` does)."""
        failure = exc if isinstance(exc, BatchFailed) else BatchFailed(stage, exc)
        if self.failure is None:
            self.failure = failure
            if self._on_failure is not None:
                try:
                    self._on_failure(failure.stage)
                except Exception:
                    pass
            log.critical("%s; stopping with exit status %d: nothing after this batch is committed, the "
                         "consumer group redelivers it", failure, EXIT_BATCH_FAILED, exc_info=failure.cause)
        self._exit(EXIT_BATCH_FAILED)
        return failure
