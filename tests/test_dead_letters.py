"""Dead letters never fail because of their own size, and invalid input never floods the log."""

from __future__ import annotations

import hashlib
import logging

from stream_detector.events import MALFORMED_JSON, EventDecoder
from stream_detector.logs import RateLimitedLog
from stream_detector.profiles import SensorProfile
from stream_detector.runtime.dead_letters import dead_letter

LIMIT = 1_000_000


def _size(letter) -> int:
    return len(letter.key or b"") + len(letter.value) + sum(len(k) + len(v) for k, v in letter.headers)


def test_a_deeply_nested_message_is_refused_as_malformed_not_raised():
    decoder = EventDecoder(SensorProfile(("a", "b")).fields)
    decoded = decoder.decode(b'{"x":' + b"[" * 1000)
    assert decoded.reason == MALFORMED_JSON


def test_a_small_dead_letter_keeps_the_original_bytes_and_headers():
    letter = dead_letter(b"not json", b"k", [("trace", b"1")], "malformed_json", "detail", "events:0:7", LIMIT)
    assert not letter.truncated
    assert letter.value == b"not json" and letter.key == b"k"
    headers = dict(letter.headers)
    assert headers["trace"] == b"1" and headers["x-dlq-reason"] == b"malformed_json"
    assert headers["x-dlq-source"] == b"events:0:7"
    assert "x-dlq-truncated" not in headers


def test_a_record_over_the_producer_limit_is_cut_to_fit_with_its_length_and_hash():
    original = b"x" * 1_000_500  # the broker accepts it on a topic that allows it; produce() would not
    letter = dead_letter(original, b"key", [], "oversized", "1000500 bytes > limit 1000000", "events:3:42", LIMIT)
    assert letter.truncated
    assert _size(letter) <= LIMIT - 1024
    assert original.startswith(letter.value) and len(letter.value) > 900_000
    headers = dict(letter.headers)
    assert headers["x-dlq-truncated"] == b"true"
    assert headers["x-dlq-original-bytes"] == b"1000500"
    assert headers["x-dlq-original-sha256"] == hashlib.sha256(original).hexdigest().encode()
    assert headers["x-dlq-source"] == b"events:3:42"


def test_a_record_just_under_the_limit_is_cut_too_once_the_headers_are_added():
    original = b"{" * 999_950
    letter = dead_letter(original, None, [], "malformed_json", "unexpected end", "events:0:1", LIMIT)
    assert letter.truncated and _size(letter) <= LIMIT - 1024


def test_huge_original_headers_and_key_are_dropped_or_cut_rather_than_fail_the_dead_letter():
    headers = [("h", b"y" * 600_000)]
    letter = dead_letter(b"v" * 600_000, b"k" * 5000, headers, "oversized", "d", "events:0:1", LIMIT)
    assert letter.truncated and _size(letter) <= LIMIT - 1024
    names = dict(letter.headers)
    assert names["x-dlq-original-headers-dropped"] == b"1"
    assert names["x-dlq-original-key-bytes"] == b"5000" and len(letter.key) == 1024


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_invalid_messages_log_one_line_per_reason_per_interval_with_the_count_left_out(caplog):
    clock = _Clock()
    limited = RateLimitedLog(logging.getLogger("test.invalid"), interval_s=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="test.invalid"):
        for i in range(1000):
            limited.log("malformed_json", "invalid event %d", i)
        limited.log("missing_key", "invalid event %s", "other")
        clock.now = 10.5
        limited.log("malformed_json", "invalid event %d", 1000)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["invalid event 0", "invalid event other",
                     "invalid event 1000 (and 999 more with reason malformed_json since the last such line)"]
