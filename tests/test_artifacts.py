"""Unit tests for stream_detector.artifacts: save/load, integrity checks, no pickle, versions."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from stream_detector.artifacts import (
    FORMAT_VERSION, METADATA_FILE, WEIGHTS_FILE, ArtifactError, content_digest, load_artifact, new_version,
    read_signing_key, resolve_version_dir, save_artifact,
)
from stream_detector.models import build_model
from stream_detector.preprocessing import ScalerParams
from stream_detector.profiles import SensorProfile
from stream_detector.scoring import ModelRunner
from stream_detector.thresholds import fit_quantile_threshold

WINDOW = 6
CHANNELS = ("a", "b", "c")


def tiny_parts(seed: int = 0):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    profile = SensorProfile(CHANNELS)
    model = build_model("lstm_ae", {"n_features": len(CHANNELS), "window": WINDOW, "hidden": 8, "latent": 4,
                                    "score_steps": 2})
    with torch.no_grad():
        model.error_scale.copy_(torch.tensor([0.5, 2.0, 1.5]))  # not the default: must be saved too
    scaler = ScalerParams.fit(rng.normal(3.0, 2.0, (200, len(CHANNELS))))
    threshold = fit_quantile_threshold(rng.gamma(2.0, 1.0, 500), 0.99)
    return model, profile, scaler, threshold


def save_tiny(root: Path, version: str | None = None, seed: int = 0) -> Path:
    model, profile, scaler, threshold = tiny_parts(seed)
    return save_artifact(root, model, profile, scaler, threshold, training={"note": "unit test"}, version=version)


def windows(n: int = 16, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(3.0, 2.0, (n, WINDOW, len(CHANNELS))).astype(np.float32)


def test_saved_layout_and_metadata(tmp_path):
    model, profile, scaler, threshold = tiny_parts()
    path = save_artifact(tmp_path, model, profile, scaler, threshold, version="v1")
    assert path == tmp_path / "v1"
    assert sorted(p.name for p in path.iterdir()) == [METADATA_FILE, WEIGHTS_FILE]
    assert [p.name for p in tmp_path.iterdir()] == ["v1"]  # no temporary directory left behind
    meta = json.loads((path / METADATA_FILE).read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["version"] == "v1"
    assert meta["model"] == {"kind": "lstm_ae", "config": model.config()}
    assert meta["features"] == list(CHANNELS) and meta["window"] == WINDOW
    assert meta["threshold"] == threshold
    assert re.fullmatch(r"[0-9a-f]{64}", meta["weights_sha256"])


def test_load_gives_identical_scores_to_the_in_memory_model(tmp_path):
    model, profile, scaler, threshold = tiny_parts()
    path = save_artifact(tmp_path, model, profile, scaler, threshold)
    artifact = load_artifact(tmp_path)
    assert artifact.path == path
    assert artifact.window == WINDOW and artifact.kind == "lstm_ae"
    assert artifact.feature_names == CHANNELS
    assert artifact.scaler == scaler
    assert artifact.threshold == threshold["value"]
    assert not artifact.model.training
    torch.testing.assert_close(artifact.model.error_scale, model.error_scale, rtol=0, atol=0)

    x = windows()
    model.eval()
    with torch.inference_mode():
        from stream_detector.preprocessing import Preprocessor
        expected_scores, expected_features = model.anomaly_scores(Preprocessor(scaler)(torch.from_numpy(x)))
    loaded = ModelRunner(artifact, device="cpu", trace=False).score(x)  # the artifact, bit for bit
    np.testing.assert_array_equal(loaded.scores, expected_scores.numpy())
    np.testing.assert_array_equal(loaded.feature_errors, expected_features.numpy())
    assert loaded.scores.shape == (16,) and loaded.feature_errors.shape == (16, 3)
    assert (loaded.feature_errors >= 0).all()


def test_trained_model_round_trips_through_an_artifact(tmp_path):
    from stream_detector.synthetic import generate
    from trainer.data import from_synthetic
    from trainer.fit import TrainConfig, score_windows, train_and_save

    profile = SensorProfile(("Pressure", "Temperature", "Current"))
    data = from_synthetic(generate("sensors", n_keys=2, events_per_key=60, seed=3), profile)
    assert len(data.events) == 120 and not data.rejected
    config = TrainConfig(window=8, hidden=8, latent=4, epochs=2, batch_size=64, device="cpu", threads=1)
    path, result = train_and_save(data.events, profile, config, tmp_path, progress=False)
    artifact = load_artifact(path)
    assert artifact.threshold == result.threshold["value"]
    assert artifact.metadata["training"]["keys"] == 2
    x = np.random.default_rng(0).normal(0.0, 1.0, (8, 8, 3)).astype(np.float32)
    expected, _ = score_windows(result.model, result.scaler, x, torch.device("cpu"))
    np.testing.assert_array_equal(ModelRunner(artifact, device="cpu").score(x).scores, expected)


def test_tampered_weights_refused_with_checksum_error(tmp_path):
    path = save_tiny(tmp_path)
    weights = path / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit pattern in a tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        load_artifact(tmp_path)


def test_truncated_weights_refused(tmp_path):
    path = save_tiny(tmp_path)
    weights = path / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="checksum"):
        load_artifact(path)


def test_missing_weights_refused(tmp_path):
    path = save_tiny(tmp_path)
    (path / WEIGHTS_FILE).unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_artifact(path)


def rewrite_metadata(path: Path, redigest: bool = True, **changes) -> None:
    """Edits the metadata; with ``redigest`` its content digest is recomputed, so that the check
    under test (format, features, shapes) is the one that refuses it, not the digest."""
    meta = json.loads((path / METADATA_FILE).read_text())
    meta.update(changes)
    if redigest:
        meta["content_sha256"] = content_digest(meta)
    (path / METADATA_FILE).write_text(json.dumps(meta))


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 0, None, "1"])
def test_wrong_format_version_refused(tmp_path, version):
    path = save_tiny(tmp_path)
    rewrite_metadata(path, format_version=version)
    with pytest.raises(ArtifactError, match="format"):
        load_artifact(path)


def test_unreadable_metadata_refused(tmp_path):
    path = save_tiny(tmp_path)
    (path / METADATA_FILE).write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable metadata"):
        load_artifact(path)


def test_feature_list_mismatch_refused(tmp_path):
    path = save_tiny(tmp_path)
    rewrite_metadata(path, features=["a", "b", "x"])
    with pytest.raises(ArtifactError, match="feature list"):
        load_artifact(path)


def test_incompatible_model_config_refused(tmp_path):
    path = save_tiny(tmp_path)
    meta = json.loads((path / METADATA_FILE).read_text())
    meta["model"]["config"]["hidden"] = 16  # weights no longer fit the architecture
    meta["content_sha256"] = content_digest(meta)
    (path / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="incompatible"):
        load_artifact(path)


def test_loading_never_unpickles(tmp_path, monkeypatch):
    save_tiny(tmp_path)

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used while loading an artifact")

    class ForbiddenUnpickler:
        def __init__(self, *args, **kwargs):
            forbidden()

    monkeypatch.setattr(pickle, "Unpickler", ForbiddenUnpickler)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch.serialization, "load", forbidden)
    artifact = load_artifact(tmp_path)
    assert ModelRunner(artifact, device="cpu").score(windows(2)).scores.shape == (2,)


def test_weights_file_is_safetensors_not_pickle(tmp_path):
    path = save_tiny(tmp_path)
    head = (path / WEIGHTS_FILE).read_bytes()[:16]
    assert not head.startswith(b"\x80")  # pickle protocol marker
    assert not head.startswith(b"PK")  # torch.save zip archive
    header_len = int.from_bytes(head[:8], "little")
    header = json.loads((path / WEIGHTS_FILE).read_bytes()[8:8 + header_len])
    assert "error_scale" in header


def test_existing_version_is_not_overwritten(tmp_path):
    save_tiny(tmp_path, version="v1")
    with pytest.raises(ArtifactError, match="already exists"):
        save_tiny(tmp_path, version="v1")


def test_resolve_version_dir_picks_newest_and_ignores_hidden_and_incomplete(tmp_path):
    older = save_tiny(tmp_path, version="20260101T000000Z-aaaaaa", seed=1)
    newest = save_tiny(tmp_path, version="20260102T000000Z-bbbbbb", seed=2)
    # A trainer's half-written version (hidden temp dir), even one sorting last with metadata in it.
    hidden = tmp_path / ".20270101T000000Z-cccccc.tmp"
    shutil.copytree(older, hidden)
    # A directory without metadata is not a version.
    (tmp_path / "20280101T000000Z-dddddd").mkdir()
    (tmp_path / "notes.txt").write_text("not a version")
    assert resolve_version_dir(tmp_path) == newest
    assert load_artifact(tmp_path).version == "20260102T000000Z-bbbbbb"
    assert resolve_version_dir(older) == older  # a version directory resolves to itself


def test_resolve_version_dir_errors(tmp_path):
    with pytest.raises(ArtifactError, match="no model at"):
        resolve_version_dir(tmp_path / "missing")
    with pytest.raises(ArtifactError, match="no model version"):
        resolve_version_dir(tmp_path)


def test_new_version_is_time_sortable_and_unique():
    a, b = new_version(), new_version()
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", a)
    assert a != b
    assert a[:16] <= b[:16]


def test_threshold_edited_in_metadata_is_refused(tmp_path):
    path = save_tiny(tmp_path)
    meta = json.loads((path / METADATA_FILE).read_text())
    meta["threshold"]["value"] *= 1e6  # would silence every alert
    (path / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="metadata checksum mismatch"):
        load_artifact(path)


@pytest.mark.parametrize("entry", ["scaler", "window", "profile"])
def test_any_metadata_entry_edited_is_refused(tmp_path, entry):
    path = save_tiny(tmp_path)
    meta = json.loads((path / METADATA_FILE).read_text())
    meta[entry] = {"edited": True} if entry != "window" else meta["window"] + 1
    (path / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="metadata checksum mismatch"):
        load_artifact(path)


def test_format_1_artifact_is_refused_with_a_retrain_hint(tmp_path):
    path = save_tiny(tmp_path)
    meta = json.loads((path / METADATA_FILE).read_text())
    meta["format_version"] = 1
    del meta["content_sha256"]
    (path / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="retrain"):
        load_artifact(path)


def signed_tiny(root: Path, key: bytes, version: str = "v1") -> Path:
    model, profile, scaler, threshold = tiny_parts()
    return save_artifact(root, model, profile, scaler, threshold, version=version, signing_key=key)


def test_signed_artifact_loads_with_its_key_and_without_one(tmp_path):
    path = signed_tiny(tmp_path / "models", b"secret-1")
    meta = json.loads((path / METADATA_FILE).read_text())
    assert meta["signature"]["algorithm"] == "hmac-sha256"
    assert b"secret-1" not in (path / METADATA_FILE).read_bytes()
    assert load_artifact(path, signing_key=b"secret-1").version == "v1"
    assert load_artifact(path).version == "v1"  # no key configured: the digest alone is checked


def test_wrong_key_or_unsigned_artifact_is_refused_when_a_key_is_configured(tmp_path):
    signed = signed_tiny(tmp_path / "a", b"secret-1")
    with pytest.raises(ArtifactError, match="signature does not match"):
        load_artifact(signed, signing_key=b"secret-2")
    unsigned = save_tiny(tmp_path / "b")
    with pytest.raises(ArtifactError, match="not signed"):
        load_artifact(unsigned, signing_key=b"secret-1")


def test_resigned_metadata_without_the_key_is_refused(tmp_path):
    """Whoever edits the threshold and recomputes the digest still cannot forge the signature."""
    path = signed_tiny(tmp_path, b"secret-1")
    meta = json.loads((path / METADATA_FILE).read_text())
    meta["threshold"]["value"] *= 1e6
    meta["content_sha256"] = content_digest(meta)
    (path / METADATA_FILE).write_text(json.dumps(meta))
    assert load_artifact(path).threshold > 1e3  # digest alone: consistent, so it loads without a key
    with pytest.raises(ArtifactError, match="signature does not match"):
        load_artifact(path, signing_key=b"secret-1")


def test_signing_key_file_errors_are_clear(tmp_path):
    with pytest.raises(ArtifactError, match="cannot read signing key"):
        read_signing_key(tmp_path / "missing.key")
    (tmp_path / "empty.key").write_text("  \n")
    with pytest.raises(ArtifactError, match="empty"):
        read_signing_key(tmp_path / "empty.key")
    (tmp_path / "k.key").write_text("abc\n")
    assert read_signing_key(tmp_path / "k.key") == b"abc"
