"""Secrets never show in a Settings' repr, and SASL PLAIN is never sent in clear text by accident."""

from __future__ import annotations

import logging

import pytest

from stream_detector.settings import Settings

SASL_SSL = dict(security_protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_username="svc",
                sasl_password="hunter2-secret", ssl_key_password="key-pass-secret")


def test_repr_and_str_of_settings_mask_the_passwords():
    settings = Settings(**SASL_SSL)
    for text in (repr(settings), str(settings), f"{settings}", repr([settings])):
        assert "hunter2-secret" not in text and "key-pass-secret" not in text
        assert "sasl_password='***'" in text and "sasl_username='svc'" in text


def test_a_settings_object_logged_with_percent_r_shows_no_password(caplog):
    with caplog.at_level(logging.INFO):
        logging.getLogger("test.settings").info("starting with %r", Settings(**SASL_SSL))
    assert "hunter2-secret" not in caplog.text


def test_sasl_plain_over_plaintext_is_refused_with_what_to_change():
    with pytest.raises(ValueError, match="clear text.*SASL_SSL.*sasl_plain_without_tls"):
        Settings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="u", sasl_password="p")


def test_sasl_plain_over_plaintext_is_accepted_when_explicitly_allowed():
    settings = Settings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="u",
                        sasl_password="p", sasl_plain_without_tls=True)
    assert settings.sasl_plain_without_tls


def test_scram_over_sasl_plaintext_needs_no_exception():
    Settings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-256", sasl_username="u", sasl_password="p")
