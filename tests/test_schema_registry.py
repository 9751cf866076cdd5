"""Schema-Registry-framed values: bytes written by confluent-kafka's own serializers (Avro, JSON
Schema, Protobuf) against confluent-kafka's in-memory registry client (``mock://``), decoded by the
worker's registry path. No registry server runs here (see the README: Schema Registry)."""

from __future__ import annotations

import socket
import uuid

import numpy as np
import orjson
import pytest
import torch

pytest.importorskip("confluent_kafka.schema_registry.avro",
                    reason="LOUD SKIP: the schema-registry extra is not installed (deploy/bootstrap.sh installs it)")

from confluent_kafka.schema_registry import SchemaRegistryClient  # noqa: E402
from confluent_kafka.schema_registry.avro import AvroSerializer  # noqa: E402
from confluent_kafka.schema_registry.json_schema import JSONSerializer  # noqa: E402
from confluent_kafka.schema_registry.protobuf import ProtobufSerializer  # noqa: E402
from confluent_kafka.serialization import MessageField, SerializationContext  # noqa: E402
from google.protobuf import descriptor_pb2, descriptor_pool  # noqa: E402
from google.protobuf.message_factory import GetMessageClass  # noqa: E402

from stream_detector import events as ev  # noqa: E402
from stream_detector.artifacts import load_artifact, save_artifact  # noqa: E402
from stream_detector.detector import Detector, RawRecord  # noqa: E402
from stream_detector.errors import RegistryUnavailable  # noqa: E402
from stream_detector.events import EventDecoder, encode_event  # noqa: E402
from stream_detector.models import build_model  # noqa: E402
from stream_detector.preprocessing import ScalerParams  # noqa: E402
from stream_detector.profiles import FieldSpec, SensorProfile  # noqa: E402
from stream_detector.schema_registry import (RegistryValueDecoder, client_config,  # noqa: E402
                                             register_alert_schema, registry_client)
from stream_detector.settings import Settings, SettingsError  # noqa: E402
from stream_detector.thresholds import fit_quantile_threshold  # noqa: E402

CHANNELS = ("a", "b", "c")
TOPIC = "events"
CONTEXT = SerializationContext(TOPIC, MessageField.VALUE)
T0 = 1_767_225_600

AVRO_SCHEMA = orjson.dumps({
    "type": "record", "name": "Reading", "namespace": "test", "fields": [
        {"name": "key", "type": "string"}, {"name": "event_id", "type": "string"},
        {"name": "timestamp", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "fields", "type": {"type": "record", "name": "Fields",
                                    "fields": [{"name": name, "type": "double"} for name in CHANNELS]}},
    ]}).decode()
JSON_SCHEMA = orjson.dumps({
    "$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
    "required": ["key", "event_id", "timestamp", "fields"],
    "properties": {"key": {"type": "string"}, "event_id": {"type": "string"}, "timestamp": {"type": "number"},
                   "fields": {"type": "object", "properties": {name: {"type": "number"} for name in CHANNELS}}},
}).decode()


def _protobuf_classes():
    """A Reading message class (as protoc would generate it) built from its descriptor."""
    F = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="reading.proto", package="test", syntax="proto3")
    fields = file.message_type.add(name="Fields")
    for number, name in enumerate(CHANNELS, 1):
        fields.field.add(name=name, number=number, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
    reading = file.message_type.add(name="Reading")
    for number, (name, kind) in enumerate((("key", F.TYPE_STRING), ("event_id", F.TYPE_STRING),
                                           ("timestamp", F.TYPE_INT64)), 1):
        reading.field.add(name=name, number=number, type=kind, label=F.LABEL_OPTIONAL)
    reading.field.add(name="fields", number=4, type=F.TYPE_MESSAGE, type_name=".test.Fields", label=F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return (GetMessageClass(pool.FindMessageTypeByName("test.Reading")),
            GetMessageClass(pool.FindMessageTypeByName("test.Fields")))


Reading, Fields = _protobuf_classes()


def doc(key: str, i: int, values: tuple[float, ...]) -> dict:
    return {"key": key, "event_id": f"{key}-{i}", "timestamp": T0 + i, "fields": dict(zip(CHANNELS, values))}


def framed(client, fmt: str, event: dict) -> bytes:
    """The event as the producer's confluent-kafka serializer writes it (registering its schema)."""
    if fmt == "avro":
        from datetime import datetime, timezone

        record = {**event, "timestamp": datetime.fromtimestamp(event["timestamp"], timezone.utc)}
        return AvroSerializer(client, AVRO_SCHEMA)(record, CONTEXT)
    if fmt == "json":
        return JSONSerializer(JSON_SCHEMA, client)(event, CONTEXT)
    message = Reading(key=event["key"], event_id=event["event_id"], timestamp=event["timestamp"] * 1000,
                      fields=Fields(**event["fields"]))
    return ProtobufSerializer(Reading, client, {"use.deprecated.format": False})(message, CONTEXT)


FORMATS = ("avro", "json", "protobuf")


@pytest.fixture
def client():
    # confluent-kafka's in-memory registry, one per test (its store is per URL).
    return SchemaRegistryClient.new_client({"url": f"mock://registry-{uuid.uuid4().hex}"})


@pytest.fixture
def decoder(client):
    return RegistryValueDecoder(EventDecoder([FieldSpec(name) for name in CHANNELS]), client, TOPIC)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_framed_record_decodes_into_the_same_event_as_its_json_twin(client, decoder, fmt):
    event = doc("dev-1", 3, (1.5, -2.0, 0.0))  # 0.0: a proto3 zero is a reading, not a missing field
    raw = framed(client, fmt, event)
    assert raw[0] == 0 and raw[:1] + raw[1:5] != orjson.dumps(event)[:5]
    decoded = decoder.decode(raw)
    assert isinstance(decoded, ev.Event), decoded
    assert decoded == decoder.decode(orjson.dumps(event)) == EventDecoder(
        [FieldSpec(name) for name in CHANNELS]).decode(orjson.dumps(event))


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_unknown_schema_id_is_dead_lettered_as_unknown_schema(client, decoder, fmt):
    raw = framed(client, fmt, doc("dev-1", 1, (1.0, 2.0, 3.0)))
    unknown = raw[:1] + (4242).to_bytes(4, "big") + raw[5:]
    decoded = decoder.decode(unknown)
    assert isinstance(decoded, ev.Invalid) and decoded.reason == ev.UNKNOWN_SCHEMA
    assert "4242" in decoded.detail


@pytest.mark.parametrize("fmt", FORMATS)
def test_garbage_after_a_valid_frame_is_dead_lettered_as_schema_decode_failed(client, decoder, fmt):
    raw = framed(client, fmt, doc("dev-1", 1, (1.0, 2.0, 3.0)))
    garbage = raw[:5] + b"\xff\xfe\x00garbage\x80"
    decoded = decoder.decode(garbage)
    assert isinstance(decoded, ev.Invalid) and decoded.reason == ev.SCHEMA_DECODE_FAILED, decoded


def test_a_frame_without_a_whole_schema_id_is_schema_decode_failed(decoder):
    decoded = decoder.decode(b"\x00\x00\x01")
    assert isinstance(decoded, ev.Invalid) and decoded.reason == ev.SCHEMA_DECODE_FAILED


def test_a_decoded_record_is_still_validated_like_json(client, decoder):
    event = doc("dev-1", 1, (1.0, 2.0, 3.0))
    event["key"] = ""  # valid for the schema, not as an event key
    decoded = decoder.decode(framed(client, "json", event))
    assert isinstance(decoded, ev.Invalid) and decoded.reason == ev.BAD_KEY


def test_plain_json_still_decodes_with_the_registry_on(decoder):
    raw = encode_event("dev-2", "e-1", T0, {"a": 1.0, "b": 2.0, "c": 3.0})
    assert decoder.decode(raw) == ev.Event("dev-2", "e-1", float(T0), (1.0, 2.0, 3.0))
    assert decoder.decode(b"{not json").reason == ev.MALFORMED_JSON


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_registry_that_cannot_be_reached_fails_the_batch_instead_of_dead_lettering(client, artifact):
    raw = framed(client, "avro", doc("dev-1", 1, (1.0, 2.0, 3.0)))
    down = SchemaRegistryClient({"url": f"http://127.0.0.1:{_closed_port()}", "max.retries": 1,
                                 "retries.wait.ms": 10, "retries.max.wait.ms": 20, "timeout": 2})
    decoder = RegistryValueDecoder(EventDecoder([FieldSpec(name) for name in CHANNELS]), down, TOPIC)
    with pytest.raises(RegistryUnavailable):
        decoder.decode(raw)
    detector = Detector(artifact, lambda windows: None, clock=lambda: float(T0))
    detector.decoder = decoder
    with pytest.raises(RegistryUnavailable):  # out of prepare: the pipeline's batch failure policy stops the worker
        detector.prepare([RawRecord(raw, b"dev-1", float(T0), 0, 0)])
    assert sum(detector.stats.invalid.values()) == 0


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = build_model("lstm_ae", {"n_features": len(CHANNELS), "window": 4, "hidden": 8, "latent": 4})
    scaler = ScalerParams.fit(rng.normal(0.0, 1.0, (100, len(CHANNELS))))
    threshold = fit_quantile_threshold(rng.gamma(2.0, 1.0, 100), 0.99)
    root = tmp_path_factory.mktemp("model")
    save_artifact(root, model, SensorProfile(CHANNELS), scaler, threshold, version="20260101T000000Z-abcdef")
    return load_artifact(root)


@pytest.mark.parametrize("fmt", FORMATS)
def test_framed_records_are_scored_like_their_json_twins(client, artifact, fmt):
    from stream_detector.scoring import ModelRunner

    runner = ModelRunner(artifact, device="cpu")
    events = [doc("dev-1", i, (float(i), -float(i), 0.5 * i)) for i in range(8)]

    def scores(records):
        detector = Detector(artifact, runner.score, clock=lambda: float(T0 + 100))
        detector.decoder = RegistryValueDecoder(detector.decoder, client, TOPIC)
        batch = detector.prepare([RawRecord(raw, b"dev-1", float(T0), 0, offset) for offset, raw in enumerate(records)])
        assert not batch.invalid
        return [decision.score for decision in detector.finish(batch, detector.score(batch))]

    framed_scores = scores([framed(client, fmt, event) for event in events])
    json_scores = scores([orjson.dumps(event) for event in events])
    assert len(framed_scores) == 5  # window 4: events 4..8 are scored
    assert framed_scores == pytest.approx(json_scores)


def test_the_alert_schema_is_registered_under_the_alerts_topic_value_subject(client):
    schema_id = register_alert_schema(client, "alerts")
    assert register_alert_schema(client, "alerts") == schema_id
    registered = client.get_latest_version("alerts-value")
    assert registered.schema_id == schema_id and registered.schema.schema_type == "JSON"


def test_registry_credentials_reach_the_client_but_never_the_settings_repr(tmp_path):
    secret = tmp_path / "user-info"
    secret.write_text("reader:s3cret\n")
    settings = Settings.load(env={"STREAM_DETECTOR_SCHEMA_REGISTRY_URL": "https://registry.example:8081",
                                  "STREAM_DETECTOR_SCHEMA_REGISTRY_USER_INFO_FILE": str(secret)})
    assert client_config(settings)["basic.auth.user.info"] == "reader:s3cret"
    assert "s3cret" not in repr(settings)
    assert "s3cret" not in repr(Settings(schema_registry_url="https://reader:s3cret@registry.example"))
    assert registry_client(settings) is not None


def test_registry_settings_are_checked():
    with pytest.raises(SettingsError, match="schema_registry_url"):
        Settings(schema_registry_url="registry:8081")
    with pytest.raises(SettingsError, match="alerts_schema_register needs schema_registry_url"):
        Settings(alerts_schema_register=True)
