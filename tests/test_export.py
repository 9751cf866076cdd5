"""Unit tests of `trainer export`: the TorchScript file scores like the worker's ModelRunner."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from stream_detector.artifacts import load_artifact
from stream_detector.registry import CHAMPION, set_alias
from stream_detector.scoring import ModelRunner
from trainer.cli import main as trainer_main
from trainer.export import ExportError, export_model
from test_artifacts import save_tiny, windows


def test_torchscript_export_gives_the_same_scores_as_the_model_runner(tmp_path):
    version = save_tiny(tmp_path / "m", version="v1")
    out = export_model(version, "torchscript", tmp_path / "model.pt")
    extra = {"stream_detector.json": ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    info = json.loads(extra["stream_detector.json"])
    assert info["version"] == "v1" and info["features"] == ["a", "b", "c"] and info["window"] == 6
    raw = windows(37, seed=5)
    expected = ModelRunner(load_artifact(version), device="cpu", trace=False).score(raw)
    with torch.inference_mode():
        got = loaded(torch.from_numpy(raw)).numpy()
    np.testing.assert_allclose(got[:, 0], expected.scores, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got[:, 1:], expected.feature_errors, rtol=1e-4, atol=1e-6)


def test_trainer_export_command_exports_the_champion_or_a_named_version(tmp_path, capsys):
    save_tiny(tmp_path / "m", version="v1")
    save_tiny(tmp_path / "m", version="v2", seed=1)
    set_alias(tmp_path / "m", CHAMPION, "v1")
    assert trainer_main(["export", "--model-dir", str(tmp_path / "m"), "--format", "torchscript",
                         "--out", str(tmp_path / "champion.pt")]) == 0
    extra = {"stream_detector.json": ""}
    torch.jit.load(str(tmp_path / "champion.pt"), _extra_files=extra)
    assert json.loads(extra["stream_detector.json"])["version"] == "v1"
    assert trainer_main(["export", "--model-dir", str(tmp_path / "m"), "--version", "v2", "--format",
                         "torchscript", "--out", str(tmp_path / "v2.pt")]) == 0
    torch.jit.load(str(tmp_path / "v2.pt"), _extra_files=extra)
    assert json.loads(extra["stream_detector.json"])["version"] == "v2"
    assert trainer_main(["export", "--model-dir", str(tmp_path / "m"), "--version", "v9", "--format",
                         "torchscript", "--out", str(tmp_path / "v9.pt")]) == 1
    assert "no version 'v9'" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("onnx") is not None, reason="onnx is installed")
def test_onnx_export_without_the_onnx_package_says_how_to_get_it(tmp_path):
    version = save_tiny(tmp_path / "m")
    with pytest.raises(ExportError, match=r"stream-detector\[onnx\]"):
        export_model(version, "onnx", tmp_path / "model.onnx")
