"""Unit tests for stream_detector.profiles: features and config round trips."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from stream_detector.profiles import FieldSpec, SensorProfile, TransactionProfile, profile_from_config

DAY = 86_400.0
MIDNIGHT = 1_767_225_600.0  # 2026-01-01T00:00:00Z


class Key:
    """One key's state and feature rows through a profile."""

    def __init__(self, profile):
        self.profile = profile
        self.state = np.zeros(profile.state_size, dtype=np.float64)

    def __call__(self, values, timestamp):
        out = np.full(self.profile.n_features, np.nan, dtype=np.float32)
        self.profile.featurize(values, timestamp, self.state, out)
        return dict(zip(self.profile.feature_names, out.tolist()))


def test_transaction_profile_shape_and_fields():
    p = TransactionProfile()
    assert p.n_features == 6
    assert p.fields == (FieldSpec("amount", "number"), FieldSpec("terminal_id", "id"))
    assert p.state_size == 3 + 16


def test_first_transaction_features():
    key = Key(TransactionProfile())
    f = key([99.0, "T1"], MIDNIGHT + 6 * 3600)  # 06:00 UTC: a quarter of the day
    assert f["log_amount"] == pytest.approx(math.log(100.0))
    assert f["amount_to_key_mean"] == 1.0
    assert f["log_seconds_since_prev"] == pytest.approx(math.log1p(DAY))  # no previous: one day
    assert f["hour_sin"] == pytest.approx(1.0, abs=1e-6)
    assert f["hour_cos"] == pytest.approx(0.0, abs=1e-6)
    assert f["new_terminal"] == 1.0


def test_transaction_ratio_gap_hour_and_terminal_over_a_sequence():
    p = TransactionProfile()
    alpha = 1.0 - 0.5 ** (1.0 / 16.0)
    key = Key(p)
    key([99.0, "T1"], MIDNIGHT)
    f2 = key([50.0, "T1"], MIDNIGHT + 3600)
    assert f2["amount_to_key_mean"] == pytest.approx(50.0 / (99.0 + 1.0))
    assert f2["log_seconds_since_prev"] == pytest.approx(math.log1p(3600.0))
    assert f2["hour_sin"] == pytest.approx(math.sin(2 * math.pi / 24), abs=1e-6)
    assert f2["hour_cos"] == pytest.approx(math.cos(2 * math.pi / 24), abs=1e-6)
    assert f2["new_terminal"] == 0.0  # a repeated terminal is not new
    mean = 99.0 + alpha * (50.0 - 99.0)  # running mean after the second transaction
    f3 = key([300.0, "T2"], MIDNIGHT + 3600 + 30)
    assert f3["amount_to_key_mean"] == pytest.approx(300.0 / (mean + 1.0), rel=1e-6)
    assert f3["log_seconds_since_prev"] == pytest.approx(math.log1p(30.0))
    assert f3["new_terminal"] == 1.0
    assert key([10.0, "T2"], MIDNIGHT + 7200)["new_terminal"] == 0.0
    assert key([10.0, "T1"], MIDNIGHT + 7300)["new_terminal"] == 0.0


def test_integer_and_string_terminal_ids_are_the_same_terminal():
    key = Key(TransactionProfile())
    key([1.0, 42], MIDNIGHT)
    assert key([1.0, "42"], MIDNIGHT + 1)["new_terminal"] == 0.0


def test_terminal_memory_forgets_old_terminals():
    key = Key(TransactionProfile(terminal_memory=2))
    assert [key([1.0, t], MIDNIGHT + i)["new_terminal"] for i, t in enumerate("ABCA")] == [1.0, 1.0, 1.0, 1.0]
    key2 = Key(TransactionProfile(terminal_memory=2))
    assert [key2([1.0, t], MIDNIGHT + i)["new_terminal"] for i, t in enumerate("ABAB")] == [1.0, 1.0, 0.0, 0.0]


def test_negative_amount_and_out_of_order_time_are_clamped():
    key = Key(TransactionProfile())
    key([10.0, "T"], MIDNIGHT + 100)
    f = key([-5.0, "T"], MIDNIGHT)  # earlier than the previous event
    assert f["log_amount"] == 0.0
    assert f["amount_to_key_mean"] == 0.0
    assert f["log_seconds_since_prev"] == 0.0


def test_keys_have_independent_state():
    p = TransactionProfile()
    a, b = Key(p), Key(p)
    a([100.0, "T1"], MIDNIGHT)
    first_of_b = b([100.0, "T1"], MIDNIGHT + 10)
    assert first_of_b["new_terminal"] == 1.0  # a's history is not b's
    assert first_of_b["log_seconds_since_prev"] == pytest.approx(math.log1p(DAY))
    assert a([100.0, "T1"], MIDNIGHT + 10)["new_terminal"] == 0.0


def test_sensor_profile_copies_channels_in_order():
    p = SensorProfile(["Pressure", "Temperature", "Voltage"])
    assert p.feature_names == ("Pressure", "Temperature", "Voltage")
    assert p.fields == tuple(FieldSpec(c, "number") for c in p.feature_names)
    assert p.state_size == 0 and p.n_features == 3
    out = np.zeros(3, dtype=np.float32)
    p.featurize((0.5, -2.0, 230.0), MIDNIGHT, np.zeros(0), out)
    np.testing.assert_array_equal(out, np.float32([0.5, -2.0, 230.0]))


def test_sensor_profile_needs_a_channel():
    with pytest.raises(ValueError):
        SensorProfile([])


@pytest.mark.parametrize("profile", [
    SensorProfile(["a", "b"]),
    TransactionProfile(),
    TransactionProfile(amount_field="amt", terminal_field="tid", terminal_memory=4, mean_halflife=3.0),
], ids=["sensors", "transactions", "transactions-custom"])
def test_profile_config_round_trip(profile):
    config = json.loads(json.dumps(profile.to_config()))  # as stored in the artifact
    rebuilt = profile_from_config(config)
    assert type(rebuilt) is type(profile)
    assert rebuilt.to_config() == profile.to_config()
    assert rebuilt.fields == profile.fields
    assert rebuilt.feature_names == profile.feature_names
    assert rebuilt.state_size == profile.state_size
    # Same features from the same events.
    events = [((12.0, "T1"), MIDNIGHT), ((30.0, "T2"), MIDNIGHT + 50), ((8.0, "T1"), MIDNIGHT + 4000)]
    if isinstance(profile, SensorProfile):
        events = [((1.0, 2.0), MIDNIGHT), ((3.0, -4.0), MIDNIGHT + 1)]
    original, copy = Key(profile), Key(rebuilt)
    for values, ts in events:
        assert original(values, ts) == copy(values, ts)


def test_unknown_profile_config_rejected():
    with pytest.raises(ValueError, match="unknown profile"):
        profile_from_config({"name": "weather"})
    with pytest.raises(ValueError):
        profile_from_config({})


def test_default_transaction_config_has_no_new_options():
    # Artifacts trained before the options existed must keep loading with the same features.
    assert TransactionProfile().to_config() == {"name": "transactions", "amount_field": "amount",
                                                "terminal_field": "terminal_id", "terminal_memory": 16,
                                                "mean_halflife": 16.0}


def test_robust_transaction_features_by_hand():
    p = TransactionProfile(robust_features=True, amount_memory=3)
    assert p.feature_names[-2:] == ("amount_to_key_median", "log_tx_last_day")
    assert p.n_features == 8 and p.state_size == 3 + 16 + 1 + 3
    key = Key(p)
    f1 = key([10.0, "T"], MIDNIGHT)
    assert f1["amount_to_key_median"] == 1.0 and f1["log_tx_last_day"] == 0.0
    f2 = key([20.0, "T"], MIDNIGHT + DAY)  # one previous transaction, one day ago: e^-1 of it is left
    assert f2["amount_to_key_median"] == pytest.approx(20.0 / (10.0 + 1.0))
    assert f2["log_tx_last_day"] == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)
    key([30.0, "T"], MIDNIGHT + DAY)
    f4 = key([400.0, "T"], MIDNIGHT + DAY)  # median of 10, 20, 30 = 20
    assert f4["amount_to_key_median"] == pytest.approx(400.0 / 21.0)
    f5 = key([5.0, "T"], MIDNIGHT + DAY)  # memory 3: 20, 30, 400 -> median 30; a large amount barely moves it
    assert f5["amount_to_key_median"] == pytest.approx(5.0 / 31.0)
    # The base features are unchanged by the option.
    plain = Key(TransactionProfile())
    for values, t in [([10.0, "T"], MIDNIGHT), ([20.0, "T"], MIDNIGHT + DAY)]:
        base = plain(values, t)
    assert {k: f2[k] for k in base} == base


def test_context_fields_are_read_from_the_event_and_copied():
    p = TransactionProfile(context_fields=("terminal_risk", "terminal_load"))
    assert p.fields[2:] == (FieldSpec("terminal_risk", "number"), FieldSpec("terminal_load", "number"))
    assert p.feature_names[-2:] == ("terminal_risk", "terminal_load")
    f = Key(p)([10.0, "T", 0.25, 3.0], MIDNIGHT)
    assert f["terminal_risk"] == 0.25 and f["terminal_load"] == 3.0
    with pytest.raises(ValueError):
        TransactionProfile(context_fields=("amount",))
    with pytest.raises(ValueError):
        TransactionProfile(context_fields=("x", "x"))


@pytest.mark.parametrize("profile", [
    TransactionProfile(robust_features=True),
    TransactionProfile(robust_features=True, amount_memory=5, context_fields=("risk",)),
    TransactionProfile(context_fields=("a", "b")),
], ids=["robust", "robust-context", "context"])
def test_transaction_options_round_trip_through_the_artifact_config(profile):
    rebuilt = profile_from_config(json.loads(json.dumps(profile.to_config())))
    assert rebuilt.to_config() == profile.to_config()
    assert rebuilt.feature_names == profile.feature_names and rebuilt.state_size == profile.state_size
    extra = (0.5,) * len(profile.context_fields)
    original, copy = Key(profile), Key(rebuilt)
    for i, amount in enumerate([12.0, 30.0, 8.0, 300.0]):
        assert original((amount, f"T{i % 2}") + extra, MIDNIGHT + 100 * i) == \
            copy((amount, f"T{i % 2}") + extra, MIDNIGHT + 100 * i)
