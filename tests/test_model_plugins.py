"""Unit tests of model kinds from other packages, registered through the entry point group."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest

from stream_detector.artifacts import load_artifact, save_artifact
from stream_detector.models import ENTRY_POINT_GROUP, MODEL_KINDS, build_model, load_entry_point_kinds
from stream_detector.scoring import ModelRunner
from test_artifacts import CHANNELS, WINDOW, tiny_parts, windows


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    """A tiny installed distribution (a dist-info with entry_points.txt) on sys.path."""

    def install(entry_points: str, module_source: str) -> None:
        (tmp_path / "thirdparty_kind.py").write_text(textwrap.dedent(module_source))
        dist = tmp_path / "thirdparty_kind-0.1.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-kind\nVersion: 0.1\n")
        (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{textwrap.dedent(entry_points)}")
        monkeypatch.syspath_prepend(str(tmp_path))

    before = dict(MODEL_KINDS)
    yield install
    MODEL_KINDS.clear()
    MODEL_KINDS.update(before)
    sys.modules.pop("thirdparty_kind", None)


PLUGIN = """
    from stream_detector.models.dense_autoencoder import DenseAutoencoder

    class WideDense(DenseAutoencoder):
        kind = "wide_dense"
"""


def test_a_kind_from_another_package_is_built_saved_loaded_and_scored(plugin_path, tmp_path):
    plugin_path("wide_dense = thirdparty_kind:WideDense\n", PLUGIN)
    assert "wide_dense" not in MODEL_KINDS
    model = build_model("wide_dense", {"n_features": len(CHANNELS), "window": WINDOW, "hidden": 8, "latent": 4})
    assert model.kind == "wide_dense"
    _, profile, scaler, threshold = tiny_parts()
    path = save_artifact(tmp_path / "m", model, profile, scaler, threshold, version="v1")
    artifact = load_artifact(path)
    assert artifact.kind == "wide_dense"
    scores = ModelRunner(artifact, device="cpu").score(windows(5))
    assert scores.scores.shape == (5,) and np.isfinite(scores.scores).all()


def test_broken_or_mismatched_plugins_are_reported_and_left_out(plugin_path):
    plugin_path("""\
        other_name = thirdparty_kind:WideDense
        not_a_model = thirdparty_kind:helper
        lstm_ae = thirdparty_kind:WideDense
        missing = thirdparty_kind:Nope
        """, PLUGIN + "\n    def helper():\n        return None\n")
    problems = load_entry_point_kinds()
    assert "not 'other_name'" in problems["other_name"]
    assert "not an AnomalyModel subclass" in problems["not_a_model"]
    assert "built-in" in problems["lstm_ae"]
    assert "AttributeError" in problems["missing"]
    assert MODEL_KINDS["lstm_ae"].__module__ == "stream_detector.models.lstm_autoencoder"
    assert not {"other_name", "not_a_model", "missing"} & set(MODEL_KINDS)
