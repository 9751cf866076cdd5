"""Unit tests of the model registry: aliases, promotion, rollback, what the worker serves and reloads."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from stream_detector.artifacts import METADATA_FILE, WEIGHTS_FILE, ArtifactError, resolve_version_dir
from stream_detector.registry import (
    ALIASES_FILE, CHALLENGER, CHAMPION, list_versions, load_served, read_aliases, rollback, served_candidates,
    set_alias,
)
from stream_detector.settings import Settings
from stream_detector.worker import DetectorService
from trainer.cli import main as trainer_main
from test_artifacts import save_tiny, signed_tiny


def set_created(path: Path, created_at: str) -> None:
    """Rewrites a version's creation time (and its digest, so it still loads)."""
    from stream_detector.artifacts import content_digest

    meta = json.loads((path / METADATA_FILE).read_text())
    meta["created_at"] = created_at
    meta["content_sha256"] = content_digest(meta)
    (path / METADATA_FILE).write_text(json.dumps(meta))


def corrupt_weights(path: Path) -> None:
    data = bytearray((path / WEIGHTS_FILE).read_bytes())
    data[-10] ^= 0xFF
    (path / WEIGHTS_FILE).write_bytes(bytes(data))


def test_without_aliases_the_newest_by_creation_time_is_served_not_by_name(tmp_path):
    older = save_tiny(tmp_path, version="zzzz")
    newer = save_tiny(tmp_path, version="aaaa")
    set_created(older, "2026-01-01T00:00:00+00:00")
    set_created(newer, "2026-06-01T00:00:00+00:00")
    assert resolve_version_dir(tmp_path) == newer
    assert [v.name for v in list_versions(tmp_path)] == ["zzzz", "aaaa"]


def test_without_aliases_a_newest_version_that_fails_to_load_is_skipped_at_startup(tmp_path):
    good = save_tiny(tmp_path, version="good")
    bad = save_tiny(tmp_path, version="bad")
    set_created(good, "2026-01-01T00:00:00+00:00")
    set_created(bad, "2026-06-01T00:00:00+00:00")
    corrupt_weights(bad)
    assert load_served(tmp_path).version == "good"


def test_champion_is_served_whatever_is_newer(tmp_path):
    first = save_tiny(tmp_path, version="v1")
    save_tiny(tmp_path, version="v2")
    set_alias(tmp_path, CHAMPION, "v1")
    assert served_candidates(tmp_path) == [first]
    assert load_served(tmp_path).version == "v1"


def test_a_champion_that_fails_to_load_is_a_clear_error_not_skipped(tmp_path):
    save_tiny(tmp_path, version="v1")
    champion = save_tiny(tmp_path, version="v2")
    set_alias(tmp_path, CHAMPION, "v2")
    corrupt_weights(champion)
    with pytest.raises(ArtifactError, match="checksum"):
        load_served(tmp_path)


def test_promote_refuses_a_version_that_does_not_load_and_leaves_aliases_unchanged(tmp_path):
    save_tiny(tmp_path, version="v1")
    bad = save_tiny(tmp_path, version="v2")
    set_alias(tmp_path, CHAMPION, "v1")
    corrupt_weights(bad)
    with pytest.raises(ArtifactError, match="checksum"):
        set_alias(tmp_path, CHAMPION, "v2")
    assert read_aliases(tmp_path)["aliases"] == {CHAMPION: "v1"}
    with pytest.raises(ArtifactError, match="no version"):
        set_alias(tmp_path, CHAMPION, "missing")


def test_rollback_returns_the_champion_to_its_previous_versions_in_turn(tmp_path):
    for v in ("v1", "v2", "v3"):
        save_tiny(tmp_path, version=v)
        set_alias(tmp_path, CHAMPION, v)
    set_alias(tmp_path, CHALLENGER, "v1")
    assert rollback(tmp_path) == "v2"
    assert rollback(tmp_path) == "v1"
    assert read_aliases(tmp_path)["aliases"] == {CHAMPION: "v1", CHALLENGER: "v1"}
    with pytest.raises(ArtifactError, match="no previous version"):
        rollback(tmp_path)
    history = read_aliases(tmp_path)["history"]
    assert [h["version"] for h in history if h["alias"] == CHAMPION] == ["v1", "v2", "v3", "v2", "v1"]


def test_aliases_file_is_replaced_atomically_without_leftovers(tmp_path):
    save_tiny(tmp_path, version="v1")
    set_alias(tmp_path, CHAMPION, "v1")
    assert sorted(p.name for p in tmp_path.iterdir()) == [ALIASES_FILE, "v1"]
    (tmp_path / ALIASES_FILE).write_text("{broken")
    with pytest.raises(ArtifactError, match="unreadable aliases"):
        read_aliases(tmp_path)


def test_trainer_promote_rollback_and_models_commands(tmp_path, capsys):
    save_tiny(tmp_path, version="v1")
    save_tiny(tmp_path, version="v2")
    assert trainer_main(["promote", "v1", "--model-dir", str(tmp_path)]) == 0
    assert trainer_main(["promote", "v2", "--model-dir", str(tmp_path)]) == 0
    assert trainer_main(["promote", "v1", "--model-dir", str(tmp_path), "--alias", "challenger"]) == 0
    assert trainer_main(["rollback", "--model-dir", str(tmp_path)]) == 0
    assert read_aliases(tmp_path)["aliases"] == {CHAMPION: "v1", CHALLENGER: "v1"}
    capsys.readouterr()
    assert trainer_main(["models", "--model-dir", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert "v1" in listing and "challenger,champion" in listing and "lstm_ae" in listing and "sensors" in listing
    assert trainer_main(["promote", "nope", "--model-dir", str(tmp_path)]) == 1
    assert "not promoted" in capsys.readouterr().err


def test_trainer_promote_with_a_signing_key_requires_the_signature(tmp_path, capsys):
    key = tmp_path / "key"
    key.write_text("secret-1")
    signed_tiny(tmp_path / "m", b"secret-1", version="signed")
    save_tiny(tmp_path / "m", version="unsigned")
    args = ["--model-dir", str(tmp_path / "m"), "--signing-key", str(key)]
    assert trainer_main(["promote", "unsigned", *args]) == 1
    assert "not signed" in capsys.readouterr().err
    assert trainer_main(["promote", "signed", *args]) == 0


def train_args(out: Path, *extra: str) -> list[str]:
    return ["train", "--profile", "sensors", "--synthetic", "--synthetic-keys", "2", "--synthetic-events-per-key",
            "60", "--window", "8", "--hidden", "4", "--latent", "2", "--epochs", "1", "--threads", "1",
            "--no-progress", "--out", str(out), *extra]


def test_trainer_train_makes_only_the_first_version_champion_unless_promoted(tmp_path):
    out = tmp_path / "model"
    assert trainer_main(train_args(out)) == 0
    first = read_aliases(out)["aliases"][CHAMPION]
    assert trainer_main(train_args(out)) == 0
    assert read_aliases(out)["aliases"][CHAMPION] == first  # registered, not served
    assert len(list_versions(out)) == 2
    assert trainer_main(train_args(out, "--promote")) == 0
    assert read_aliases(out)["aliases"][CHAMPION] != first


def test_trainer_train_signs_with_a_key_file(tmp_path):
    key = tmp_path / "key"
    key.write_text("secret-1")
    out = tmp_path / "model"
    assert trainer_main(train_args(out, "--signing-key", str(key))) == 0
    meta = json.loads((resolve_version_dir(out) / METADATA_FILE).read_text())
    assert meta["signature"]["algorithm"] == "hmac-sha256"


def service_for(model_dir: Path, **settings) -> DetectorService:
    return DetectorService(Settings(model_dir=str(model_dir), torch_threads=1, **settings))


def test_worker_serves_the_champion_and_hot_reloads_when_the_alias_moves(tmp_path):
    save_tiny(tmp_path, version="v1")
    save_tiny(tmp_path, version="v2", seed=1)
    set_alias(tmp_path, CHAMPION, "v1")
    service = service_for(tmp_path)
    assert service.runner.version == "v1"
    assert not asyncio.run(service.maybe_reload())  # a newer version alone is not served
    set_alias(tmp_path, CHAMPION, "v2")
    assert asyncio.run(service.maybe_reload())
    assert service.runner.version == "v2"
    assert service.detector._pending_model[0].version == "v2"  # applied from the next micro-batch on
    info = service.metrics.registry.get_sample_value("stream_detector_model_info", {
        "version": "v2", "kind": "lstm_ae", "profile": "sensors", "window": "6", "features": "a,b,c",
        "device": "cpu"})
    assert info == 1.0
    rollback(tmp_path)
    assert asyncio.run(service.maybe_reload()) and service.runner.version == "v1"


def test_worker_refuses_a_bad_champion_once_and_keeps_serving(tmp_path):
    save_tiny(tmp_path, version="v1")
    bad = save_tiny(tmp_path, version="v2")
    set_alias(tmp_path, CHAMPION, "v1")
    service = service_for(tmp_path)
    corrupt_weights(bad)
    # The alias file is edited by hand here: promotion itself would refuse it.
    data = read_aliases(tmp_path)
    data["aliases"][CHAMPION] = "v2"
    (tmp_path / ALIASES_FILE).write_text(json.dumps(data))
    assert not asyncio.run(service.maybe_reload())
    assert not asyncio.run(service.maybe_reload())
    assert service.runner.version == "v1"
    assert service.metrics.registry.get_sample_value("stream_detector_model_reload_failures_total") == 1.0


def test_worker_with_a_signing_key_refuses_unsigned_artifacts(tmp_path):
    key = tmp_path / "key"
    key.write_text("secret-1")
    save_tiny(tmp_path / "unsigned", version="v1")
    with pytest.raises(ArtifactError, match="not signed"):
        service_for(tmp_path / "unsigned", model_signing_key_file=str(key))
    signed_tiny(tmp_path / "signed", b"secret-1")
    assert service_for(tmp_path / "signed", model_signing_key_file=str(key)).runner.version == "v1"
