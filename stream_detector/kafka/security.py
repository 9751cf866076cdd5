"""Kafka client security from the one settings object, for both client libraries in use.

The worker consumes and produces through Faust (aiokafka); admin, lag and demo clients use
confluent-kafka. Both get the same TLS and SASL settings from here, so a deployment configures
security once.
"""

from __future__ import annotations

import ssl
from typing import Any

import faust

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
    return faust.SASLCredentials(
        username=settings.sasl_username,
        password=settings.sasl_password,
        ssl_context=ssl_context(settings) if protocol == "SASL_SSL" else None,
        mechanism=settings.sasl_mechanism,
    )


def confluent_config(settings: Settings) -> dict[str, Any]:
    """librdkafka properties for confluent-kafka clients (empty for PLAINTEXT)."""
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
        config.update({"sasl.mechanism": settings.sasl_mechanism, "sasl.username": settings.sasl_username,
                       "sasl.password": settings.sasl_password})
    return config
