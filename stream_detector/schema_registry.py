"""Event values framed by a Confluent-compatible Schema Registry: Avro, JSON Schema or Protobuf.

A framed value is the magic byte 0, the schema id (4 bytes, big-endian), then the payload the
producer's serializer wrote (for Protobuf, the message indexes first). With ``schema_registry_url``
set, the worker tells the two kinds of value apart by their first byte: a JSON document never
starts with a zero byte, so framed values and plain JSON can share a topic. A framed value is
deserialised with ``confluent_kafka.schema_registry``'s own deserializers, which fetch each schema
id once and cache it, and the result is validated like a JSON event
(:meth:`~stream_detector.events.EventDecoder.from_mapping`): the same envelope settings, the same
reasons. With the registry off, nothing here runs: the JSON path is unchanged.

Failures are told apart so that nothing valid is lost:

- the registry answers that the id does not exist (HTTP 404): ``unknown_schema`` dead letter;
- the bytes do not deserialise with the schema: ``schema_decode_failed`` dead letter;
- the registry cannot be asked (connection refused, timeout, 5xx, our credentials refused), after
  the client's own retries (``max.retries`` 3, with jittered back-off from 1 s): the message may
  be valid, so :class:`~stream_detector.errors.RegistryUnavailable` fails the batch; the worker
  stops without committing it (the batch failure policy) and a restarted worker reads it again.
"""

from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING, Any, Callable

from .errors import RegistryUnavailable
from .events import OVERSIZED, SCHEMA_DECODE_FAILED, UNKNOWN_SCHEMA, Event, EventDecoder, Invalid, RecordMeta

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger("stream_detector.schema_registry")

MAGIC_BYTE = 0
FRAME_BYTES = 5  # magic byte + schema id
# The registry's "not found" answers: the schema id (40403) or a subject it references (40401/40402).
NOT_FOUND = 404
INSTALL_HINT = "Schema Registry support needs the extra: pip install 'stream-detector[schema-registry]'"


def _no_subject(ctx: Any, record_name: Any) -> None:
    """A subject name strategy naming no subject: a value is read with the schema of its frame's id
    alone (no subject lookups, no "latest version" reads, no data-contract rules)."""
    return None


_NO_SUBJECT = {"subject.name.strategy": _no_subject}


def client_config(settings: "Settings") -> dict[str, Any]:
    """The registry client's configuration from the settings (credentials included: never log it)."""
    conf: dict[str, Any] = {"url": settings.schema_registry_url, "timeout": settings.schema_registry_timeout_s}
    if settings.schema_registry_user_info:
        conf["basic.auth.user.info"] = settings.schema_registry_user_info
    if settings.schema_registry_ca_file:
        conf["ssl.ca.location"] = settings.schema_registry_ca_file
    return conf


def registry_client(settings: "Settings") -> Any:
    """A ``SchemaRegistryClient`` for the settings' registry."""
    try:
        from confluent_kafka.schema_registry import SchemaRegistryClient
    except ImportError as exc:  # the optional extra is not installed
        raise ImportError(f"{INSTALL_HINT} ({exc})") from exc
    return SchemaRegistryClient(client_config(settings))


def _unavailable(exc: BaseException) -> bool:
    """Whether a registry error means "cannot ask now" rather than "no such schema"."""
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    if isinstance(exc, SchemaRegistryError):
        return exc.http_status_code != NOT_FOUND
    # Transport errors (httpx's ConnectError, timeouts, TLS failures) and OS-level errors.
    return isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore",
                                                                               "httpcore2", "ssl")


class RegistryValueDecoder:
    """Decodes framed values through the registry and everything else with the JSON decoder.

    ``proto_client`` fetches Protobuf schemas in their serialized form (the registry client caches
    a schema per id whatever format was asked for, so the Protobuf fetches get a client of their own).
    """

    def __init__(self, decoder: EventDecoder, client: Any, topic: str = "", proto_client: Any | None = None):
        from confluent_kafka.schema_registry.avro import AvroDeserializer
        from confluent_kafka.schema_registry.json_schema import JSONDeserializer

        self.decoder = decoder
        self.client = client
        self.proto_client = proto_client if proto_client is not None else client
        self.topic = topic
        from confluent_kafka.serialization import MessageField, SerializationContext

        self._avro = AvroDeserializer(client, conf=_NO_SUBJECT)
        self._json = JSONDeserializer(None, schema_registry_client=client, conf=_NO_SUBJECT)
        self._context = SerializationContext(topic, MessageField.VALUE)
        self._types: dict[int, str] = {}  # schema id -> AVRO, JSON or PROTOBUF
        self._proto: dict[tuple[int, tuple[int, ...]], Callable[[bytes], Any]] = {}

    # The JSON decoder's interface, for what reads the decoder directly.
    @property
    def fields(self) -> Any:
        return self.decoder.fields

    def from_mapping(self, doc: dict[str, Any], record: RecordMeta | None = None) -> Event | Invalid:
        return self.decoder.from_mapping(doc, record)

    def decode(self, raw: bytes | None, record: RecordMeta | None = None) -> Event | Invalid:
        if not raw or raw[0] != MAGIC_BYTE:
            return self.decoder.decode(raw, record)
        if len(raw) > self.decoder.max_bytes:
            return Invalid(OVERSIZED, f"{len(raw)} bytes > limit {self.decoder.max_bytes}")
        if len(raw) < FRAME_BYTES:
            return Invalid(SCHEMA_DECODE_FAILED, f"a framed value needs {FRAME_BYTES} bytes of frame, not {len(raw)}")
        schema_id = int.from_bytes(raw[1:FRAME_BYTES], "big")
        try:
            kind = self._schema_type(schema_id)
            if kind == "PROTOBUF":
                value = self._protobuf(raw, schema_id)
            else:
                deserialize = self._json if kind == "JSON" else self._avro
                value = deserialize(raw, self._context)
        except Exception as exc:
            if _unavailable(exc):
                raise RegistryUnavailable(f"schema registry unavailable for schema id {schema_id}: "
                                          f"{type(exc).__name__}: {exc}"[:300]) from exc
            if getattr(exc, "http_status_code", None) == NOT_FOUND:
                return Invalid(UNKNOWN_SCHEMA, f"schema id {schema_id}: {exc}"[:200])
            return Invalid(SCHEMA_DECODE_FAILED, f"schema id {schema_id}: {type(exc).__name__}: {exc}"[:200])
        if not isinstance(value, dict):
            return Invalid(SCHEMA_DECODE_FAILED, f"schema id {schema_id}: a {type(value).__name__}, not a record")
        return self.decoder.from_mapping(value, record)

    def _schema_type(self, schema_id: int) -> str:
        kind = self._types.get(schema_id)
        if kind is None:
            kind = self._types[schema_id] = (self.client.get_schema(schema_id).schema_type or "AVRO").upper()
        return kind

    def _protobuf(self, raw: bytes, schema_id: int) -> dict[str, Any]:
        from confluent_kafka.schema_registry.common.serde import SchemaId

        frame = SchemaId("PROTOBUF")
        frame.from_bytes(io.BytesIO(raw))
        indexes = tuple(frame.message_indexes or (0,))
        deserialize = self._proto.get((schema_id, indexes))
        if deserialize is None:
            deserialize = self._proto[(schema_id, indexes)] = self._protobuf_deserializer(schema_id, indexes)
        return message_to_dict(deserialize(raw))

    def _protobuf_deserializer(self, schema_id: int, indexes: tuple[int, ...]) -> Callable[[bytes], Any]:
        """confluent_kafka's ProtobufDeserializer for the message the frame names, its class built
        from the registry's schema (the deserializer needs a message class; the worker has none
        compiled)."""
        from confluent_kafka.schema_registry.common.protobuf import _init_pool, _str_to_proto
        from confluent_kafka.schema_registry._sync.protobuf import _resolve_named_schema
        from confluent_kafka.schema_registry.protobuf import ProtobufDeserializer
        from google.protobuf.descriptor_pool import DescriptorPool
        from google.protobuf.message_factory import GetMessageClass

        schema = self.proto_client.get_schema(schema_id, fmt="serialized")
        pool = DescriptorPool()
        _init_pool(pool)
        _resolve_named_schema(schema, self.proto_client, pool)
        file_proto = _str_to_proto("default", schema.schema_str)
        pool.Add(file_proto)
        messages, name = file_proto.message_type, []
        for depth, index in enumerate(indexes):
            if not 0 <= index < len(messages):
                raise ValueError(f"message index {list(indexes)} is not in the schema")
            name.append(messages[index].name)
            messages = messages[index].nested_type
        full_name = ".".join(([file_proto.package] if file_proto.package else []) + name)
        message_class = GetMessageClass(pool.FindMessageTypeByName(full_name))
        deserializer = ProtobufDeserializer(message_class, {"use.deprecated.format": False, **_NO_SUBJECT},
                                            schema_registry_client=self.proto_client)
        return lambda raw: deserializer(raw, self._context)


def message_to_dict(message: Any) -> dict[str, Any]:
    """A Protobuf message as the mapping an event is read from: every field of the schema by its
    own name (proto3 scalars at their zero value included: an unset 0.0 reading is a reading),
    unset message and ``optional`` fields as None, 64-bit integers as integers (not the strings of
    protobuf's JSON mapping), ``google.protobuf.Timestamp`` as seconds."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if _is_repeated(field):
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                value_field = field.message_type.fields_by_name["value"]
                out[field.name] = {k: _proto_value(value_field, v) for k, v in value.items()}
            else:
                out[field.name] = [_proto_value(field, v) for v in value]
        elif field.has_presence and not message.HasField(field.name):
            out[field.name] = None
        else:
            out[field.name] = _proto_value(field, value)
    return out


def _is_repeated(field: Any) -> bool:
    # protobuf 7 has no FieldDescriptor.label; older releases have no is_repeated.
    is_repeated = getattr(field, "is_repeated", None)
    if is_repeated is not None:
        return bool(is_repeated)
    return field.label == field.LABEL_REPEATED


def _proto_value(field: Any, value: Any) -> Any:
    from google.protobuf.descriptor import FieldDescriptor

    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.full_name == "google.protobuf.Timestamp":
            return value.seconds + value.nanos / 1e9
        return message_to_dict(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        enum = field.enum_type.values_by_number.get(value)
        return enum.name if enum is not None else value
    return value


ALERT_SCHEMA = "schemas/alert.schema.json"


def register_alert_schema(client: Any, alerts_topic: str) -> int:
    """Registers the alert JSON Schema under ``<alerts_topic>-value`` (the topic name strategy) and
    returns its id; registering the same schema again returns the same id."""
    from importlib.resources import files

    from confluent_kafka.schema_registry import Schema

    text = files("stream_detector").joinpath(ALERT_SCHEMA).read_text(encoding="utf-8")
    return client.register_schema(f"{alerts_topic}-value", Schema(text, "JSON"))
