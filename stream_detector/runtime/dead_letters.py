"""Dead-letter records: the original message with why it was refused, always small enough to send.

A dead letter carries the original value, key and headers plus ``x-dlq-reason``, ``x-dlq-detail``
and ``x-dlq-source`` (topic:partition:offset). A message the broker accepted can still be too large
for the producer once those headers are added (a 1,000,500-byte record on a topic that allows it,
against librdkafka's 1,000,000-byte ``message.max.bytes``): produce() would refuse it and the
dead letter would fail the batch. Such a record is cut to fit, and says so in its headers
(``x-dlq-truncated``, ``x-dlq-original-bytes``, ``x-dlq-original-sha256`` of the whole original
value), so that it can be matched with the original, which stays in the input topic.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

# Room left for the record's framing (librdkafka counts it against message.max.bytes) and for
# the headers a truncation adds.
RECORD_OVERHEAD_BYTES = 1024
# A key longer than this is cut too when a dead letter must shrink (keys are ids, never this long).
MAX_KEY_BYTES = 1024
MAX_DETAIL_BYTES = 512


@dataclass(slots=True)
class DeadLetter:
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    truncated: bool


def _size(key: bytes | None, value: bytes, headers: Sequence[tuple[str, bytes]]) -> int:
    return len(key or b"") + len(value) + sum(len(name) + len(body) for name, body in headers)


def dead_letter(value: bytes | None, key: bytes | None, headers: Sequence[tuple[str, bytes]], reason: str,
                detail: str, source: str, max_message_bytes: int) -> DeadLetter:
    """The dead letter of one refused message, at most ``max_message_bytes`` in all (value, key and
    headers, with room for the framing)."""
    value = value or b""
    ours = [
        ("x-dlq-reason", reason.encode()),
        ("x-dlq-detail", detail.encode("utf-8", "replace")[:MAX_DETAIL_BYTES]),
        ("x-dlq-source", source.encode()),
    ]
    original_headers = list(headers)
    budget = max_message_bytes - RECORD_OVERHEAD_BYTES
    if _size(key, value, original_headers + ours) <= budget:
        return DeadLetter(key, value, original_headers + ours, False)
    ours += [
        ("x-dlq-truncated", b"true"),
        ("x-dlq-original-bytes", str(len(value)).encode()),
        ("x-dlq-original-sha256", hashlib.sha256(value).hexdigest().encode()),
    ]
    if key is not None and len(key) > MAX_KEY_BYTES:
        ours.append(("x-dlq-original-key-bytes", str(len(key)).encode()))
        key = key[:MAX_KEY_BYTES]
    # The original headers are kept when they leave room for at least half the budget.
    if _size(None, b"", original_headers) > budget // 2:
        ours.append(("x-dlq-original-headers-dropped", str(len(original_headers)).encode()))
        original_headers = []
    out_headers = original_headers + ours
    room = max(budget - _size(key, b"", out_headers), 0)
    return DeadLetter(key, value[:room], out_headers, True)
