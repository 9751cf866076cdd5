"""Per-event decode cost of ``EventDecoder.decode`` (timeit, one thread), for the default event
contract and, where the checkout has them, the configurable envelopes.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/decode_cost.py
"""

from __future__ import annotations

import inspect
import sys
import timeit

import orjson

from stream_detector.events import EventDecoder
from stream_detector.profiles import FieldSpec

SENSORS = tuple(FieldSpec(name, "number") for name in (
    "Accelerometer1RMS", "Accelerometer2RMS", "Current", "Pressure", "Temperature", "Thermocouple", "Voltage",
    "VolumeFlowRateRMS"))
TRANSACTIONS = (FieldSpec("amount", "number"), FieldSpec("terminal_id", "id"))
VALUES = {"Accelerometer1RMS": 0.21, "Accelerometer2RMS": 0.26, "Current": 1.9, "Pressure": 0.38,
          "Temperature": 71.2, "Thermocouple": 28.5, "Voltage": 229.8, "VolumeFlowRateRMS": 32.0}


class Record:
    key = b"pump-7"
    timestamp = 1_767_225_723.0
    partition = 3
    offset = 123_456


def best_us(func, number: int = 20_000, repeat: int = 7) -> float:
    return min(timeit.repeat(func, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    cases = {
        "sensors, default contract": (EventDecoder(SENSORS), orjson.dumps(
            {"key": "pump-7", "event_id": "pump-7-000123", "timestamp": "2026-01-01T00:02:03Z", "fields": VALUES})),
        "sensors, default contract, epoch timestamp": (EventDecoder(SENSORS), orjson.dumps(
            {"key": "pump-7", "event_id": "pump-7-000123", "timestamp": 1767225723.0, "fields": VALUES})),
        "transactions, default contract": (EventDecoder(TRANSACTIONS), orjson.dumps(
            {"key": "customer-00042", "event_id": "tx-889812", "timestamp": 1767258000.5,
             "fields": {"amount": 57.30, "terminal_id": "T03120"}})),
    }
    takes_envelope = "envelope" in inspect.signature(EventDecoder).parameters
    if takes_envelope:
        from stream_detector.events import Envelope

        flat = Envelope(key_path="device", fields_path="", time_from="record_timestamp",
                        event_id_from="record_position")
        cases["sensors, flat event, key from body, time and id from the record"] = (
            EventDecoder(SENSORS, envelope=flat, topic="events"), orjson.dumps({"device": "pump-7", **VALUES}))
        record_key = Envelope(key_from="record_key")
        cases["sensors, key from the record key"] = (EventDecoder(SENSORS, envelope=record_key), orjson.dumps(
            {"event_id": "pump-7-000123", "timestamp": 1767225723.0, "fields": VALUES}))
    for name, (decoder, raw) in cases.items():
        decoded = decoder.decode(raw, Record()) if takes_envelope else decoder.decode(raw)
        assert type(decoded).__name__ == "Event", (name, decoded)
        record = Record()
        func = (lambda: decoder.decode(raw, record)) if takes_envelope else (lambda: decoder.decode(raw))
        print(f"{best_us(func):6.2f} us/event  {name}")
    print(f"python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
