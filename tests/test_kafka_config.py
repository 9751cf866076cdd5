"""Unit tests of the Kafka client configuration built from the settings: the passthrough tables per
client role, what the Faust consumer (aiokafka) gets, and the OIDC token provider (against a real
local HTTP token endpoint)."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, HTTPServer

import faust
import pytest

from stream_detector.kafka.security import OidcTokenProvider, client_config, faust_credentials, faust_options
from stream_detector.settings import Settings

OIDC = {"sasl.oauthbearer.method": "oidc", "sasl.oauthbearer.client.id": "detector",
        "sasl.oauthbearer.client.secret": "s3cr3t", "sasl.oauthbearer.scope": "kafka",
        "sasl.oauthbearer.extensions": "logicalCluster=lkc-1,identityPoolId=pool-2"}


def test_each_role_gets_common_then_its_own_properties_after_the_security_keys():
    s = Settings(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="u", sasl_password="p",
                 ssl_cafile="/ca.pem", kafka_common={"client.id": "sd", "linger.ms": 1},
                 kafka_producer={"compression.type": "zstd", "linger.ms": 20},
                 kafka_consumer={"fetch.min.bytes": 10})
    producer = client_config(s, "producer")
    consumer = client_config(s, "consumer")
    admin = client_config(s, "admin")
    assert producer["security.protocol"] == "sasl_ssl" and producer["sasl.mechanism"] == "SCRAM-SHA-512"
    assert producer["compression.type"] == "zstd" and producer["linger.ms"] == 20  # the role's beats common
    assert "fetch.min.bytes" not in producer
    assert consumer["fetch.min.bytes"] == 10 and consumer["linger.ms"] == 1 and "compression.type" not in consumer
    assert admin["client.id"] == "sd" and "compression.type" not in admin and "fetch.min.bytes" not in admin
    with pytest.raises(ValueError):
        client_config(s, "streams")


def test_oauthbearer_gives_librdkafka_the_oidc_properties_and_no_username_or_password():
    s = Settings(security_protocol="SASL_SSL", sasl_mechanism="OAUTHBEARER",
                 kafka_common={**OIDC, "sasl.oauthbearer.token.endpoint.url": "https://idp.example/token"})
    config = client_config(s, "consumer")
    assert config["sasl.mechanism"] == "OAUTHBEARER" and config["sasl.oauthbearer.method"] == "oidc"
    assert config["sasl.oauthbearer.client.secret"] == "s3cr3t"
    assert "sasl.username" not in config and "sasl.password" not in config


def test_faust_consumer_gets_the_properties_aiokafka_has_and_the_rest_are_named():
    s = Settings(kafka_common={"client.id": "sd-7", "request.timeout.ms": 45000, "socket.keepalive.enable": True},
                 kafka_consumer={"group.instance.id": "worker-1", "max.partition.fetch.bytes": "2097152",
                                 "heartbeat.interval.ms": 2000, "fetch.min.bytes": 1},
                 kafka_producer={"compression.type": "zstd"})
    options, not_passed = faust_options(s)
    assert options == {"broker_client_id": "sd-7", "broker_request_timeout": 45.0,
                       "consumer_group_instance_id": "worker-1", "consumer_max_fetch_size": 2097152,
                       "broker_heartbeat_interval": 2.0}
    assert not_passed == ["fetch.min.bytes", "socket.keepalive.enable"]  # producer properties are not the consumer's
    app = faust.App("options-test", broker="kafka://127.0.0.1:1", autodiscover=False, **options)
    assert app.conf.broker_client_id == "sd-7" and app.conf.consumer_group_instance_id == "worker-1"


def test_faust_credentials_for_oauthbearer_carry_the_oidc_token_provider():
    s = Settings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="OAUTHBEARER",
                 kafka_common={**OIDC, "sasl.oauthbearer.token.endpoint.url": "http://127.0.0.1:1/token"})
    credentials = faust_credentials(s)
    assert isinstance(credentials, faust.OAuthCredentials)
    assert isinstance(credentials.oauth_cb, OidcTokenProvider)
    assert credentials.oauth_cb.extensions() == {"logicalCluster": "lkc-1", "identityPoolId": "pool-2"}
    assert "s3cr3t" not in repr(credentials.oauth_cb)
    assert faust_options(s)[1] == []  # the sasl.oauthbearer.* properties are the provider's


class _TokenEndpoint(BaseHTTPRequestHandler):
    requests: list[dict[str, list[str]]] = []

    def do_POST(self) -> None:  # noqa: N802
        form = urllib.parse.parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
        type(self).requests.append(form)
        ok = form.get("client_secret") == ["s3cr3t"]
        body = json.dumps({"access_token": f"token-{len(self.requests)}", "expires_in": 3600} if ok
                          else {"error": "invalid_client"}).encode()
        self.send_response(200 if ok else 401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def token_endpoint():
    _TokenEndpoint.requests = []
    server = HTTPServer(("127.0.0.1", 0), _TokenEndpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/token"
    server.shutdown()
    server.server_close()


def test_oidc_token_provider_does_the_client_credentials_grant_and_reuses_the_token(token_endpoint):
    provider = OidcTokenProvider.from_properties({**OIDC, "sasl.oauthbearer.token.endpoint.url": token_endpoint})
    assert asyncio.run(provider.token()) == "token-1"
    assert asyncio.run(provider.token()) == "token-1"  # cached until a minute before it expires
    assert _TokenEndpoint.requests == [{"grant_type": ["client_credentials"], "client_id": ["detector"],
                                        "client_secret": ["s3cr3t"], "scope": ["kafka"]}]


def test_oidc_token_provider_refused_credentials_raise(token_endpoint):
    provider = OidcTokenProvider.from_properties({**OIDC, "sasl.oauthbearer.client.secret": "wrong",
                                                  "sasl.oauthbearer.token.endpoint.url": token_endpoint})
    with pytest.raises(OSError):  # urllib's HTTPError for the 401
        provider.fetch()


def test_oidc_token_provider_names_the_missing_properties():
    with pytest.raises(ValueError, match="sasl.oauthbearer.token.endpoint.url"):
        OidcTokenProvider.from_properties({"sasl.oauthbearer.client.id": "x", "sasl.oauthbearer.client.secret": "y"})
