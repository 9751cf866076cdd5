"""The package's errors, and the reason codes of the failures a single message can cause.

Every failure the worker raises on purpose derives from :class:`StreamDetectorError`, so callers
tell the product's own failures apart from library errors with one ``except``.
"""

from __future__ import annotations

# Dead-letter reasons for exceptions a single message raised while being decoded or windowed (a
# bug or a library's limit, e.g. msgspec recursing on deeply nested JSON): the message is
# dead-lettered like any invalid one, never let out of its batch.
DECODE_FAILED = "decode_failed"
WINDOW_FAILED = "window_failed"
# A window whose model score is NaN or infinite: never judged (it is neither calm nor over), and
# its event is dead-lettered so that it can be replayed.
NON_FINITE_SCORE = "non_finite_score"
# An event whose record key is not its window key, or that reached another partition than its key's
# earlier events (with key_partition_check=dead_letter): windowed here, its key's window would be
# split between partitions, and so between workers.
KEY_PARTITION_MISMATCH = "key_partition_mismatch"
PROCESSING_REASONS = (DECODE_FAILED, WINDOW_FAILED, NON_FINITE_SCORE, KEY_PARTITION_MISMATCH)


class KeyPartitionMismatch(Exception):
    """An event that would split its key's window across partitions (see KEY_PARTITION_MISMATCH)."""


class StreamDetectorError(Exception):
    """Base of the errors the package raises on purpose."""


class ConfigurationError(StreamDetectorError, ValueError):
    """Settings that cannot work (refused at start, with what to change)."""


class DeliveryError(StreamDetectorError, RuntimeError):
    """A message was not delivered to the broker (after librdkafka's own retries). ``purged``: the
    producer dropped it itself (the broker out of reach too long), so it may be sent again."""

    purged: bool = False


class BatchFailed(StreamDetectorError):
    """A micro-batch could not be finished: its events are not judged, and no later offset may be
    committed. ``stage`` names the step that failed (``score``, ``judge``, ``send_alerts``, ...)."""

    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"micro-batch failed at {stage}: {type(cause).__name__}: {cause}")
        self.stage = stage
        self.cause = cause


class RegistryUnavailable(StreamDetectorError):
    """The schema registry could not be asked (down, unreachable, refusing our credentials): the
    message may be valid, so it is never dead-lettered; its batch fails instead (and is redelivered)."""


class UnsupportedDependency(StreamDetectorError, RuntimeError):
    """An installed library outside the versions the worker was tested with (its Faust classes
    override methods of that library's own, so another version may not run them correctly): the
    worker refuses to start and says which versions it takes."""
