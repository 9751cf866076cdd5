"""Kafka client configuration from the one settings object, for both client libraries in use.

The worker consumes through Faust (aiokafka); its output producer and the admin, lag, produce and
alerts clients are confluent-kafka (librdkafka). All get the same TLS and SASL settings from here,
and the librdkafka clients the passthrough tables (``kafka_common`` and ``kafka_consumer`` or
``kafka_producer``) after the product's own keys, so a deployment configures Kafka once. The
settings refuse passthrough keys the product owns or needs (acks, idempotence, isolation), so
what is merged here can only add to the product's configuration.

aiokafka takes no librdkafka properties: :func:`faust_options` maps the ones it has an equivalent
for (:data:`FAUST_PROPERTIES`, and ``sasl.oauthbearer.*`` with OIDC) and names the rest, which the
Faust consumer does not get.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import urllib.parse
import urllib.request
from typing import Any, Callable

import faust
from aiokafka.abc import AbstractTokenProvider

from ..settings import Settings


def ssl_context(settings: Settings) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=settings.ssl_cafile or None)
    context.check_hostname = settings.ssl_check_hostname
    if settings.ssl_certfile:
        context.load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile or None,
                                password=settings.ssl_key_password or None)
    return context


def faust_credentials(settings: Settings) -> Any:
    """``broker_credentials`` for faust.App, or None for PLAINTEXT."""
    protocol = settings.security_protocol
    if protocol == "PLAINTEXT":
        return None
    if protocol == "SSL":
        return faust.SSLCredentials(ssl_context(settings))
    tls = ssl_context(settings) if protocol == "SASL_SSL" else None
    if settings.sasl_mechanism == "OAUTHBEARER":
        return faust.OAuthCredentials(oauth_cb=OidcTokenProvider.from_properties(_consumer_properties(settings)),
                                      ssl_context=tls)
    return faust.SASLCredentials(
        username=settings.sasl_username,
        password=settings.sasl_password,
        ssl_context=tls,
        mechanism=settings.sasl_mechanism,
    )


def confluent_config(settings: Settings) -> dict[str, Any]:
    """librdkafka security properties for confluent-kafka clients (empty for PLAINTEXT)."""
    protocol = settings.security_protocol
    if protocol == "PLAINTEXT":
        return {}
    config: dict[str, Any] = {"security.protocol": protocol.lower()}
    if protocol in ("SSL", "SASL_SSL"):
        if settings.ssl_cafile:
            config["ssl.ca.location"] = settings.ssl_cafile
        if settings.ssl_certfile:
            config["ssl.certificate.location"] = settings.ssl_certfile
        if settings.ssl_keyfile:
            config["ssl.key.location"] = settings.ssl_keyfile
        if settings.ssl_key_password:
            config["ssl.key.password"] = settings.ssl_key_password
        config["ssl.endpoint.identification.algorithm"] = "https" if settings.ssl_check_hostname else "none"
    if protocol.startswith("SASL"):
        config["sasl.mechanism"] = settings.sasl_mechanism
        if settings.sasl_mechanism != "OAUTHBEARER":  # OIDC's client id and secret come from kafka_common
            config.update({"sasl.username": settings.sasl_username, "sasl.password": settings.sasl_password})
    return config


def client_config(settings: Settings, role: str) -> dict[str, Any]:
    """Security, then the passthrough properties of ``role`` (``admin``, ``consumer`` or ``producer``),
    for a confluent-kafka client (``bootstrap.servers`` is the caller's)."""
    if role not in ("admin", "consumer", "producer"):
        raise ValueError(f"unknown client role {role!r}")
    config = {**confluent_config(settings), **settings.kafka_common}
    if role == "consumer":
        config.update(settings.kafka_consumer)
    elif role == "producer":
        config.update(settings.kafka_producer)
    return config


def _consumer_properties(settings: Settings) -> dict[str, Any]:
    return {**settings.kafka_common, **settings.kafka_consumer}


# librdkafka property -> (Faust setting, conversion): what the Faust consumer (aiokafka) can take.
_MS = ("ms", lambda value: float(value) / 1000.0)
_INT = ("int", lambda value: int(value))
_STR = ("str", lambda value: str(value))
FAUST_PROPERTIES: dict[str, tuple[str, tuple[str, Callable[[Any], Any]]]] = {
    "client.id": ("broker_client_id", _STR),
    "request.timeout.ms": ("broker_request_timeout", _MS),
    "max.poll.interval.ms": ("broker_max_poll_interval", _MS),
    "heartbeat.interval.ms": ("broker_heartbeat_interval", _MS),
    "rebalance.timeout.ms": ("broker_rebalance_timeout", _MS),
    "max.partition.fetch.bytes": ("consumer_max_fetch_size", _INT),
    "metadata.max.age.ms": ("consumer_metadata_max_age_ms", _INT),
    "connections.max.idle.ms": ("consumer_connections_max_idle_ms", _INT),
    "group.instance.id": ("consumer_group_instance_id", _STR),
}


def faust_options(settings: Settings) -> tuple[dict[str, Any], list[str]]:
    """Faust app settings for the passthrough properties aiokafka has an equivalent of, and the
    names of those it has none for (logged by the worker: the Faust consumer does not get them)."""
    options: dict[str, Any] = {}
    not_passed: list[str] = []
    for prop, value in sorted(_consumer_properties(settings).items()):
        if prop in FAUST_PROPERTIES:
            name, (_, convert) = FAUST_PROPERTIES[prop]
            options[name] = convert(value)
        elif prop.startswith("sasl.oauthbearer.") and settings.sasl_mechanism == "OAUTHBEARER":
            continue  # the OIDC token provider's
        else:
            not_passed.append(prop)
    return options, not_passed


class OidcTokenProvider(AbstractTokenProvider):
    """OAUTHBEARER tokens for aiokafka from an OpenID Connect token endpoint (client credentials
    grant), read from the same ``sasl.oauthbearer.*`` properties librdkafka's ``oidc`` method uses;
    a token is reused until a minute before it expires."""

    def __init__(self, token_endpoint_url: str, client_id: str, client_secret: str, scope: str = "",
                 extensions: dict[str, str] | None = None, timeout_s: float = 30.0):
        self.token_endpoint_url = token_endpoint_url
        self.client_id = client_id
        self._client_secret = client_secret
        self.scope = scope
        self._extensions = extensions or {}
        self.timeout_s = timeout_s
        self._token: str | None = None
        self._expires_at = 0.0

    @classmethod
    def from_properties(cls, properties: dict[str, Any]) -> "OidcTokenProvider":
        def get(name: str) -> str:
            return str(properties.get("sasl.oauthbearer." + name, ""))

        missing = [name for name in ("token.endpoint.url", "client.id", "client.secret") if not get(name)]
        if missing:
            raise ValueError("OAUTHBEARER needs " + ", ".join("sasl.oauthbearer." + name for name in missing))
        extensions = dict(item.split("=", 1) for item in get("extensions").split(",") if "=" in item)
        return cls(get("token.endpoint.url"), get("client.id"), get("client.secret"), get("scope"), extensions)

    def __repr__(self) -> str:  # never the secret
        return f"OidcTokenProvider({self.token_endpoint_url!r}, client_id={self.client_id!r})"

    def fetch(self) -> str:
        """A valid access token (blocking: an HTTP request when the cached one is due)."""
        if self._token is not None and time.time() < self._expires_at:
            return self._token
        form = {"grant_type": "client_credentials", "client_id": self.client_id, "client_secret": self._client_secret}
        if self.scope:
            form["scope"] = self.scope
        request = urllib.request.Request(self.token_endpoint_url, data=urllib.parse.urlencode(form).encode(),
                                         headers={"Content-Type": "application/x-www-form-urlencoded",
                                                  "Accept": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            body = json.loads(response.read())
        token = body.get("access_token")
        if not isinstance(token, str) or not token:
            raise RuntimeError(f"token endpoint {self.token_endpoint_url} answered without an access_token")
        self._token = token
        self._expires_at = time.time() + max(float(body.get("expires_in", 300)) - 60.0, 10.0)
        return token

    async def token(self) -> str:
        return await asyncio.get_running_loop().run_in_executor(None, self.fetch)

    def extensions(self) -> dict[str, str]:
        return dict(self._extensions)
