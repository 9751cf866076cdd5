"""Unit tests for stream_detector.events: decoding, every reason code, and robustness."""

from __future__ import annotations

import json
from dataclasses import dataclass
import math

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from stream_detector import events as ev
from stream_detector.alerts import build_alert, encode_alert
from stream_detector.events import Event, EventDecoder, Invalid, encode_event, parse_timestamp
from stream_detector.profiles import FieldSpec

FIELDS = (FieldSpec("amount", "number"), FieldSpec("terminal_id", "id"))
JAN_1_2026 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def doc(**overrides):
    base = {"key": "cust-1", "event_id": "e-1", "timestamp": JAN_1_2026,
            "fields": {"amount": 12.5, "terminal_id": "T00001"}}
    for name, value in overrides.items():
        if value is _DROP:
            base.pop(name, None)
        else:
            base[name] = value
    return base


_DROP = object()


def raw(**overrides) -> bytes:
    return orjson.dumps(doc(**overrides))


@pytest.fixture
def decoder() -> EventDecoder:
    return EventDecoder(FIELDS)


def reason(decoded) -> str:
    assert isinstance(decoded, Invalid), f"expected Invalid, got {decoded!r}"
    assert decoded.reason in ev.REASONS
    assert isinstance(decoded.detail, str) and decoded.detail
    return decoded.reason


# --- valid events ---------------------------------------------------------------------------------


def test_valid_event_with_string_key_decodes_to_values_in_field_order(decoder):
    event = decoder.decode(raw())
    assert event == Event("cust-1", "e-1", JAN_1_2026, (12.5, "T00001"))
    assert isinstance(event.values[0], float)


def test_integer_key_event_id_and_terminal_become_strings(decoder):
    event = decoder.decode(raw(key=42, event_id=7, fields={"amount": 3, "terminal_id": 99}))
    assert isinstance(event, Event)
    assert (event.key, event.event_id) == ("42", "7")
    assert event.values == (3.0, "99")
    assert isinstance(event.values[0], float)


def test_iso_timestamp_with_z_suffix_is_utc(decoder):
    assert decoder.decode(raw(timestamp="2026-01-01T00:00:00Z")).timestamp == JAN_1_2026


def test_iso_timestamp_with_offset_and_naive_iso_read_as_utc(decoder):
    assert decoder.decode(raw(timestamp="2026-01-01T02:00:00+02:00")).timestamp == JAN_1_2026
    assert decoder.decode(raw(timestamp="2026-01-01T00:00:00")).timestamp == JAN_1_2026
    assert decoder.decode(raw(timestamp="2026-01-01T00:00:00.250Z")).timestamp == JAN_1_2026 + 0.25


def test_epoch_seconds_int_and_float(decoder):
    assert decoder.decode(raw(timestamp=int(JAN_1_2026))).timestamp == JAN_1_2026
    assert decoder.decode(raw(timestamp=JAN_1_2026 + 0.5)).timestamp == JAN_1_2026 + 0.5


def test_epoch_milliseconds_are_read_as_milliseconds(decoder):
    assert decoder.decode(raw(timestamp=int(JAN_1_2026 * 1000))).timestamp == JAN_1_2026
    assert decoder.decode(raw(timestamp=JAN_1_2026 * 1000 + 250)).timestamp == pytest.approx(JAN_1_2026 + 0.25)


def test_extra_top_level_and_payload_members_are_ignored(decoder):
    event = decoder.decode(raw(label=1, anomaly="spike",
                               fields={"amount": 1.0, "terminal_id": "T", "other": [1, 2]}))
    assert event == Event("cust-1", "e-1", JAN_1_2026, (1.0, "T"))


def test_encode_event_round_trips_through_decode(decoder):
    data = encode_event("k", "e", "2026-01-01T00:00:00Z", {"amount": 1.5, "terminal_id": "T1"}, label=0)
    assert decoder.decode(data) == Event("k", "e", JAN_1_2026, (1.5, "T1"))


# --- every reason code ----------------------------------------------------------------------------


def test_oversized_message_rejected_before_parsing():
    small = EventDecoder(FIELDS, max_bytes=20)
    assert reason(small.decode(raw())) == ev.OVERSIZED
    assert reason(small.decode(b"x" * 21)) == ev.OVERSIZED  # not even parsed
    assert isinstance(EventDecoder(FIELDS, max_bytes=len(raw())).decode(raw()), Event)  # limit is inclusive


@pytest.mark.parametrize("value", [None, b""])
def test_empty_message(decoder, value):
    assert reason(decoder.decode(value)) == ev.EMPTY


@pytest.mark.parametrize("value", [b"{not json", b'{"key": }', b"\xff\xfe\x00", b'{"key": "a"', b"   "])
def test_malformed_json(decoder, value):
    assert reason(decoder.decode(value)) == ev.MALFORMED_JSON


@pytest.mark.parametrize("value", [b"[1, 2]", b'"event"', b"3", b"null", b"true"])
def test_not_an_object(decoder, value):
    assert reason(decoder.decode(value)) == ev.NOT_AN_OBJECT


@pytest.mark.parametrize("key", [_DROP, None])
def test_missing_key(decoder, key):
    assert reason(decoder.decode(raw(key=key))) == ev.MISSING_KEY


@pytest.mark.parametrize("key", ["", 1.5, True, [1], {"a": 1}, "k" * (ev.MAX_ID_LENGTH + 1)])
def test_bad_key(decoder, key):
    assert reason(decoder.decode(raw(key=key))) == ev.BAD_KEY


def test_key_of_max_length_is_accepted(decoder):
    assert decoder.decode(raw(key="k" * ev.MAX_ID_LENGTH)).key == "k" * ev.MAX_ID_LENGTH


@pytest.mark.parametrize("event_id", [_DROP, None])
def test_missing_event_id(decoder, event_id):
    assert reason(decoder.decode(raw(event_id=event_id))) == ev.MISSING_EVENT_ID


@pytest.mark.parametrize("event_id", ["", 2.5, False, ["e"], "e" * (ev.MAX_ID_LENGTH + 1)])
def test_bad_event_id(decoder, event_id):
    assert reason(decoder.decode(raw(event_id=event_id))) == ev.BAD_EVENT_ID


@pytest.mark.parametrize("timestamp", [_DROP, None])
def test_missing_timestamp(decoder, timestamp):
    assert reason(decoder.decode(raw(timestamp=timestamp))) == ev.MISSING_TIMESTAMP


@pytest.mark.parametrize("timestamp", ["yesterday", "2026-13-01T00:00:00Z", "", -5, -0.001, True, [1], {"s": 1},
                                       "2026-01-01T00:00:00Z" + " " * 60])
def test_bad_timestamp(decoder, timestamp):
    assert reason(decoder.decode(raw(timestamp=timestamp))) == ev.BAD_TIMESTAMP


@pytest.mark.parametrize("timestamp", [1e15, 1e300, 2**64 - 1, "9999-12-31T23:59:59-05:00",
                                       "0001-01-01T00:00:00+05:00"])
def test_timestamp_beyond_year_9999_is_bad_timestamp(decoder, timestamp):
    # Such a timestamp cannot be written into an alert (datetime stops at year 9999): accepting it
    # would make the alert builder raise on the event, a poison pill for the worker.
    assert reason(decoder.decode(raw(timestamp=timestamp))) == ev.BAD_TIMESTAMP


@pytest.mark.parametrize("fields", [_DROP, None, [1, 2], "amount=1", 3])
def test_missing_fields(decoder, fields):
    assert reason(decoder.decode(raw(fields=fields))) == ev.MISSING_FIELDS


@pytest.mark.parametrize("fields", [{"terminal_id": "T"}, {"amount": None, "terminal_id": "T"},
                                    {"amount": 1.0}, {}])
def test_missing_field(decoder, fields):
    assert reason(decoder.decode(raw(fields=fields))) == ev.MISSING_FIELD


@pytest.mark.parametrize("amount", [True, False, "12.5", "abc", [1.0], {"v": 1}])
def test_non_numeric_including_bool_and_numeric_string(decoder, amount):
    assert reason(decoder.decode(raw(fields={"amount": amount, "terminal_id": "T"}))) == ev.NON_NUMERIC


def test_non_finite_number_literal_1e999(decoder):
    data = b'{"key":"k","event_id":"e","timestamp":1767225600,"fields":{"amount":1e999,"terminal_id":"T"}}'
    assert reason(decoder.decode(data)) == ev.NON_FINITE
    data = data.replace(b"1e999", b"-1e999")
    assert reason(decoder.decode(data)) == ev.NON_FINITE


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_python_json_literals(decoder, literal):
    data = b'{"key":"k","event_id":"e","timestamp":1767225600,"fields":{"amount":' + literal + b',"terminal_id":"T"}}'
    assert reason(decoder.decode(data)) == ev.NON_FINITE


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_from_mapping(decoder, value):
    assert reason(decoder.from_mapping(doc(fields={"amount": value, "terminal_id": "T"}))) == ev.NON_FINITE


def test_integer_too_large_for_a_float_is_rejected_not_raised(decoder):
    # Python ints (CSV rows, the lenient JSON path) can exceed float range.
    big = 10 ** 400
    assert reason(decoder.from_mapping(doc(fields={"amount": big, "terminal_id": "T"}))) == ev.NON_FINITE
    assert reason(decoder.from_mapping(doc(timestamp=big))) == ev.BAD_TIMESTAMP
    data = (b'{"x":1e999,"key":"k","event_id":"e","timestamp":1' + b"0" * 400
            + b',"fields":{"amount":1,"terminal_id":"T"}}')
    assert reason(decoder.decode(data)) == ev.BAD_TIMESTAMP


@pytest.mark.parametrize("terminal", [1.5, True, "", [1], {"t": 1}, "t" * (ev.MAX_ID_LENGTH + 1)])
def test_bad_identifier(decoder, terminal):
    assert reason(decoder.decode(raw(fields={"amount": 1.0, "terminal_id": terminal}))) == ev.BAD_IDENTIFIER


def test_first_failing_check_wins(decoder):
    # fields are checked before the key, the key before the event id, and so on.
    assert reason(decoder.decode(raw(key=_DROP, fields=_DROP))) == ev.MISSING_FIELDS
    assert reason(decoder.decode(raw(key=_DROP, event_id=_DROP))) == ev.MISSING_KEY
    assert reason(decoder.decode(raw(event_id=_DROP, timestamp=_DROP))) == ev.MISSING_EVENT_ID


def test_every_reason_code_is_a_distinct_string():
    assert len(set(ev.REASONS)) == len(ev.REASONS) == 18


def test_timestamps_far_ahead_of_the_clock_are_refused_when_a_limit_is_set():
    now = 1_800_000_000.0
    decoder = EventDecoder(FIELDS, max_future_s=3600, clock=lambda: now)
    ahead = decoder.decode(raw(timestamp=now + 7200))
    assert isinstance(ahead, Invalid) and ahead.reason == ev.FUTURE_TIMESTAMP
    assert not isinstance(decoder.decode(raw(timestamp=now + 60)), Invalid)
    assert not isinstance(EventDecoder(FIELDS).decode(raw(timestamp=now + 10**6)), Invalid)  # no limit offline


# --- key_field re-keying --------------------------------------------------------------------------


def test_key_field_rekeys_on_a_payload_field():
    decoder = EventDecoder(FIELDS, key_field="terminal_id")
    event = decoder.decode(raw(fields={"amount": 1.0, "terminal_id": "T9"}))
    assert event.key == "T9"
    assert event.values == (1.0, "T9")
    # The event's own key is then not needed at all.
    assert decoder.decode(raw(key=_DROP)).key == "T00001"
    assert decoder.decode(raw(fields={"amount": 1.0, "terminal_id": 17})).key == "17"


@pytest.mark.parametrize("terminal", [_DROP, None, 1.5, ""])
def test_key_field_missing_or_unusable_is_bad_key(terminal):
    fields = {"amount": 1.0}
    if terminal is not _DROP:
        fields["terminal_id"] = terminal
    decoder = EventDecoder((FieldSpec("amount"),), key_field="terminal_id")
    assert reason(decoder.decode(raw(fields=fields))) == ev.BAD_KEY


# --- parse_timestamp directly ---------------------------------------------------------------------


def test_millisecond_cutoff_reads_large_values_as_ms():
    assert parse_timestamp(1e11) == 1e11  # year 5138 in seconds: still seconds
    assert parse_timestamp(1e11 + 1) == pytest.approx((1e11 + 1) / 1000)
    assert parse_timestamp(0) == 0.0


# --- robustness: decode never raises --------------------------------------------------------------


def _alertable(event: Event) -> None:
    """Anything accepted must make it through to a published alert."""
    assert isinstance(event.key, str) and isinstance(event.event_id, str)
    assert math.isfinite(event.timestamp)
    alert = build_alert(event.key, event.event_id, event.timestamp, 2.0, 1.0, "v", "lstm_ae", ["a"],
                        np.ones(1, np.float32), 1, 4)
    encode_alert(alert)
    event.key.encode("utf-8")


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)), max_leaves=8)
timestamps = st.one_of(json_values, st.floats(min_value=-1e20, max_value=1e20), st.floats(min_value=0, max_value=1e16),
                       st.integers(min_value=0, max_value=10**16),
                       st.datetimes().map(lambda d: d.isoformat()), st.just("2026-01-01T00:00:00Z"))
payloads = st.one_of(
    json_values,
    st.fixed_dictionaries({}, optional={"amount": json_values, "terminal_id": json_values,
                                        "x": json_values}),
    st.fixed_dictionaries({"amount": st.one_of(st.floats(), st.integers(), st.booleans()),
                           "terminal_id": st.one_of(st.text(max_size=8), st.integers(), st.floats())}),
)
ids = st.one_of(st.text(min_size=1, max_size=8), st.integers(min_value=-(2**70), max_value=2**70))
good_payload = st.fixed_dictionaries({
    "amount": st.one_of(st.floats(), st.integers(min_value=-(2**70), max_value=2**70), st.booleans()),
    "terminal_id": st.one_of(ids, st.floats(), st.booleans()),
})
event_like = st.one_of(
    # Anything at all, members present or not...
    st.fixed_dictionaries({}, optional={"key": json_values, "event_id": json_values, "timestamp": timestamps,
                                        "fields": payloads, "label": json_values}),
    # ...and documents that get far enough to reach the later checks, and often pass them.
    st.fixed_dictionaries({"key": st.one_of(ids, ids, json_values), "event_id": st.one_of(ids, ids, json_values),
                           "timestamp": timestamps, "fields": st.one_of(good_payload, good_payload, payloads)},
                          optional={"label": json_values}),
)


def _json_bytes(value) -> bytes:
    # The stdlib writes what orjson refuses to (NaN, Infinity, ints beyond 64 bits), as producers do.
    return json.dumps(value).encode()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=200), event_like.map(_json_bytes),
                 event_like.map(lambda d: _json_bytes(d)[: max(len(_json_bytes(d)) - 3, 0)])))
def test_decode_never_raises_on_arbitrary_bytes(data):
    decoder = EventDecoder(FIELDS, max_bytes=10_000)
    decoded = decoder.decode(data)
    event(decoded.reason if isinstance(decoded, Invalid) else "valid")
    assert isinstance(decoded, (Event, Invalid))
    if isinstance(decoded, Invalid):
        assert decoded.reason in ev.REASONS
    else:
        _alertable(decoded)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event_like, st.sampled_from(["", "terminal_id"]))
def test_from_mapping_never_raises_on_json_ish_dicts(document, key_field):
    decoded = EventDecoder(FIELDS, key_field=key_field).from_mapping(document)
    event(decoded.reason if isinstance(decoded, Invalid) else "valid")
    assert isinstance(decoded, (Event, Invalid))
    if isinstance(decoded, Invalid):
        assert decoded.reason in ev.REASONS
    else:
        assert all(math.isfinite(v) for v in decoded.values[:1])
        _alertable(decoded)


@pytest.mark.parametrize("data", [
    # orjson refuses these; the decoder must not then accept them by a more lenient route.
    b'{"key":"\\ud800","event_id":"e","timestamp":1,"fields":{"amount":1,"terminal_id":"T"}}',
    '{"key":"k","event_id":"e","timestamp":1,"fields":{"amount":1,"terminal_id":"T"}}'.encode("utf-16"),
])
def test_json_orjson_refuses_is_not_accepted_by_a_fallback(decoder, data):
    decoded = decoder.decode(data)
    assert isinstance(decoded, Invalid)
    assert decoded.reason == ev.MALFORMED_JSON


# --- the typed read (msgspec) and the generic checks agree ----------------------------------------

_ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([1e308, -1e308, 0.0, -0.0, 1e11, 2e11]),
    st.text(max_size=4), st.sampled_from(["", "x" * 256, "x" * 257, "2026-01-01T00:00:00Z", "2026-01-01"]),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)


def _maybe(value_strategy):
    # Mostly valid, so that documents with every member valid (or one off) are common.
    choices = {"valid": value_strategy, "dropped": st.just(_DROP), "odd": _ODD_VALUES}
    return st.sampled_from(["valid"] * 6 + ["dropped", "odd"]).flatmap(choices.__getitem__)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=_maybe(st.text(min_size=1, max_size=8)), event_id=_maybe(st.integers(0, 10 ** 6)),
       timestamp=_maybe(st.floats(0, 2e12)), amount=_maybe(st.floats(-1e6, 1e6)),
       terminal=_maybe(st.text(min_size=1, max_size=5)), account=_maybe(st.text(min_size=1, max_size=5)),
       extra=st.booleans(), key_field=st.sampled_from(["", "terminal_id", "account"]))
def test_the_typed_read_accepts_and_refuses_exactly_what_the_generic_checks_do(
        key, event_id, timestamp, amount, terminal, account, extra, key_field):
    fields = {"amount": amount, "terminal_id": terminal, "account": account}
    document = doc(key=key, event_id=event_id, timestamp=timestamp,
                   fields={k: v for k, v in fields.items() if v is not _DROP})
    if extra:
        document["unexpected"] = {"nested": [1, 2]}
    message = json.dumps(document).encode()  # orjson writes no integers beyond 64 bits
    typed = EventDecoder(FIELDS, key_field=key_field)
    generic = EventDecoder(FIELDS, key_field=key_field)
    generic._typed = None
    assert typed._typed is not None  # the typed read is in use for these fields
    got, want = typed.decode(message), generic.decode(message)
    event("accepted" if isinstance(want, Event) else want.reason)
    assert got == want
    if isinstance(got, Event):
        assert [type(v) for v in got.values] == [type(v) for v in want.values]


def test_a_numeric_key_field_is_left_to_the_generic_checks():
    decoder = EventDecoder(FIELDS, key_field="amount")
    assert decoder._typed is None
    assert decoder.decode(raw(fields={"amount": 12, "terminal_id": "T1"})).key == "12"


@pytest.mark.parametrize("message", [
    b'{"key":"a","event_id":"e","timestamp":1,"fields":{"amount":1,"terminal_id":"\\ud800"}}',
    b'{"key":"\xff","event_id":"e","timestamp":1,"fields":{"amount":1,"terminal_id":"t"}}',
    b'{"key":99999999999999999999999,"event_id":"e","timestamp":1,"fields":{"amount":1,"terminal_id":"t"}}',
    b'{"key":"a","event_id":"e","timestamp":1,"fields":{"amount":1e400,"terminal_id":"t"}}',
    b'{"key":"a","key":"b","event_id":"e","timestamp":1,"fields":{"amount":1,"terminal_id":"t"}}',
])
def test_bytes_the_typed_read_sees_differently_decode_as_the_generic_checks_say(message):
    generic = EventDecoder(FIELDS)
    generic._typed = None
    assert EventDecoder(FIELDS).decode(message) == generic.decode(message)


# --- configurable envelope --------------------------------------------------------------------------

SENSOR_FIELDS = (FieldSpec("Current", "number"), FieldSpec("Pressure", "number"))


@dataclass
class Rec:
    key: bytes | None = b"pump-7"
    timestamp: float | None = JAN_1_2026 + 3.0
    partition: int = 2
    offset: int = 41


FLAT = ev.Envelope(key_path="device", fields_path="", time_from="record_timestamp",
                   event_id_from="record_position")


def test_flat_event_takes_key_from_a_body_field_and_time_and_id_from_the_record():
    decoder = EventDecoder(SENSOR_FIELDS, envelope=FLAT, topic="events")
    event = decoder.decode(orjson.dumps({"device": "pump-7", "Current": 1.9, "Pressure": 0.38}), Rec())
    assert event == Event("pump-7", "events:2:41", JAN_1_2026 + 3.0, (1.9, 0.38))


def test_record_position_event_id_is_the_same_when_the_record_is_replayed():
    decoder = EventDecoder(SENSOR_FIELDS, envelope=FLAT, topic="events")
    raw_value = orjson.dumps({"device": "pump-7", "Current": 1.9, "Pressure": 0.38})
    assert decoder.decode(raw_value, Rec(offset=7)).event_id == decoder.decode(raw_value, Rec(offset=7)).event_id
    assert decoder.decode(raw_value, Rec(offset=8)).event_id == "events:2:8"


def test_default_envelope_still_refuses_a_flat_event_as_missing_fields():
    assert reason(EventDecoder(SENSOR_FIELDS).decode(
        orjson.dumps({"device": "pump-7", "Current": 1.9, "Pressure": 0.38}), Rec())) == ev.MISSING_FIELDS


def test_key_from_the_record_key():
    decoder = EventDecoder(FIELDS, envelope=ev.Envelope(key_from="record_key"))
    event = decoder.decode(raw(key=_DROP), Rec(key=b"cust-9"))
    assert event.key == "cust-9"
    assert event.event_id == "e-1" and event.timestamp == JAN_1_2026  # the rest from the body, as by default


def test_key_from_the_record_key_missing_or_not_utf8_is_dead_lettered_with_its_reason():
    decoder = EventDecoder(FIELDS, envelope=ev.Envelope(key_from="record_key"))
    assert reason(decoder.decode(raw(), Rec(key=None))) == ev.MISSING_KEY
    assert reason(decoder.decode(raw(), None)) == ev.MISSING_KEY
    assert reason(decoder.decode(raw(), Rec(key=b"\xff\xfe"))) == ev.BAD_KEY
    assert reason(decoder.decode(raw(), Rec(key=b""))) == ev.BAD_KEY
    assert reason(decoder.decode(raw(), Rec(key=b"k" * (ev.MAX_ID_LENGTH + 1)))) == ev.BAD_KEY


def test_time_from_the_record_timestamp_missing_is_dead_lettered_as_missing_timestamp():
    decoder = EventDecoder(FIELDS, envelope=ev.Envelope(time_from="record_timestamp"))
    assert decoder.decode(raw(timestamp=_DROP), Rec()).timestamp == JAN_1_2026 + 3.0
    assert reason(decoder.decode(raw(timestamp=_DROP), Rec(timestamp=None))) == ev.MISSING_TIMESTAMP
    assert reason(decoder.decode(raw(timestamp=_DROP), Rec(timestamp=-0.001))) == ev.MISSING_TIMESTAMP


def test_record_timestamp_too_far_in_the_future_is_dead_lettered():
    decoder = EventDecoder(FIELDS, envelope=ev.Envelope(time_from="record_timestamp"), max_future_s=60,
                           clock=lambda: JAN_1_2026)
    assert reason(decoder.decode(raw(), Rec(timestamp=JAN_1_2026 + 120))) == ev.FUTURE_TIMESTAMP


def test_event_id_from_the_record_position_needs_a_position():
    decoder = EventDecoder(FIELDS, envelope=ev.Envelope(event_id_from="record_position"), topic="tx")
    assert decoder.decode(raw(event_id=_DROP), Rec(partition=0, offset=0)).event_id == "tx:0:0"
    assert reason(decoder.decode(raw(event_id=_DROP), None)) == ev.MISSING_EVENT_ID
    assert reason(decoder.decode(raw(event_id=_DROP), Rec(offset=-1))) == ev.MISSING_EVENT_ID


def test_nested_paths_for_key_time_id_and_fields():
    envelope = ev.Envelope(key_path="meta.device", time_path="meta.time", event_id_path="meta.id",
                           fields_path="payload.values")
    decoder = EventDecoder(FIELDS, envelope=envelope)
    body = {"meta": {"device": 5, "time": "2026-01-01T00:00:00Z", "id": "x-1"},
            "payload": {"values": {"amount": 2, "terminal_id": "T7"}, "other": 1}}
    assert decoder.decode(orjson.dumps(body)) == Event("5", "x-1", JAN_1_2026, (2.0, "T7"))
    body["meta"].pop("time")
    assert reason(decoder.decode(orjson.dumps(body))) == ev.MISSING_TIMESTAMP
    body["meta"] = "not an object"
    assert reason(decoder.decode(orjson.dumps(body))) == ev.MISSING_KEY
    body = {"meta": {"device": 5, "time": 1, "id": "x-1"}, "payload": {"values": [1, 2]}}
    assert reason(decoder.decode(orjson.dumps(body))) == ev.MISSING_FIELDS


def test_reason_details_name_the_configured_paths():
    decoder = EventDecoder(FIELDS, envelope=ev.Envelope(key_path="meta.device"))
    invalid = decoder.decode(raw())
    assert invalid.reason == ev.MISSING_KEY and "meta.device" in invalid.detail


@pytest.mark.parametrize("envelope", [
    ev.Envelope(),
    FLAT,
    ev.Envelope(key_from="record_key", time_from="record_timestamp", event_id_from="record_position",
                fields_path="data"),
    ev.Envelope(key_path="fields.terminal_id"),  # a path shared with a profile field
])
@given(amount=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(), st.none(), st.text(max_size=3)),
       terminal=st.one_of(st.integers(-5, 5), st.text(max_size=3), st.none()),
       key=st.one_of(st.text(max_size=4), st.integers(-3, 3), st.none()),
       with_record=st.booleans())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_typed_fast_path_and_generic_path_agree_for_every_envelope(envelope, amount, terminal, key, with_record):
    decoder = EventDecoder(FIELDS, envelope=envelope, topic="events")
    values = {"amount": amount, "terminal_id": terminal}
    body: dict = {"key": key, "device": key, "event_id": "e-1", "timestamp": JAN_1_2026}
    if envelope.fields_path:
        node = body
        for name in envelope.fields_path.split(".")[:-1]:
            node = node.setdefault(name, {})
        node[envelope.fields_path.split(".")[-1]] = values
    else:
        body.update(values)
    record = Rec() if with_record else None
    try:
        raw_value = orjson.dumps(body)
    except orjson.JSONEncodeError:
        return
    fast = decoder.decode(raw_value, record)
    slow = decoder.from_mapping(orjson.loads(raw_value), record)
    if isinstance(slow, Event):
        assert fast == slow
    else:
        assert isinstance(fast, Invalid)
        if fast.reason != ev.NON_FINITE:  # orjson writes NaN as null: the body then has a missing field
            assert fast.reason == slow.reason


def test_envelope_refuses_unknown_sources_and_empty_path_steps():
    with pytest.raises(ValueError, match="key_from"):
        ev.Envelope(key_from="header")
    with pytest.raises(ValueError, match="time_path"):
        ev.Envelope(time_path="meta..time")
    with pytest.raises(ValueError, match="key_path"):
        ev.Envelope(key_path="")
    with pytest.raises(ValueError, match="key_field"):
        EventDecoder(FIELDS, key_field="terminal_id", envelope=ev.Envelope(key_from="record_key"))
