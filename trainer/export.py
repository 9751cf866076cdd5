"""Exports a served model version to TorchScript or ONNX, preprocessing included.

The TorchScript file is the same traced, frozen scorer the worker runs (stream_detector.scoring):
raw (B, W, F) windows in, (B, 1 + F) out (each window's score, then its per-feature errors). The
artifact's version, features, window and content digest travel in the file as extra files.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

from stream_detector.artifacts import ArtifactError, ModelArtifact, load_artifact
from stream_detector.scoring import ModelRunner

FORMATS = ("torchscript", "onnx")


class ExportError(Exception):
    """An export that cannot be made: unknown format, missing optional package, untraceable model."""


def export_info(artifact: ModelArtifact) -> dict[str, object]:
    """What a consumer of the exported file needs to feed it and to trace it back to its artifact."""
    return {
        "version": artifact.version,
        "kind": artifact.kind,
        "profile": artifact.profile.name,
        "features": list(artifact.feature_names),
        "window": artifact.window,
        "threshold": artifact.threshold,
        "content_sha256": artifact.metadata.get("content_sha256"),
        "input": "raw windows, float32 (batch, window, features), oldest event first",
        "output": "float32 (batch, 1 + features): score, then per-feature errors",
    }


def export_model(model_dir: str | os.PathLike[str], fmt: str, out: str | os.PathLike[str],
                 signing_key: bytes | None = None) -> Path:
    """Writes ``model_dir``'s served version (or the version directory given) to ``out``."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    artifact = load_artifact(model_dir, signing_key=signing_key)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = json.dumps(export_info(artifact), sort_keys=True)
    if fmt == "torchscript":
        runner = ModelRunner(artifact, device="cpu", trace=True)
        if not runner.traced:
            raise ExportError(f"model {artifact.version} ({artifact.kind}) cannot be traced to TorchScript")
        torch.jit.save(runner.forward, str(out), _extra_files={"stream_detector.json": info})
        return out
    if importlib.util.find_spec("onnx") is None:
        raise ExportError("ONNX export needs the `onnx` package: pip install 'stream-detector[onnx]'")
    runner = ModelRunner(artifact, device="cpu", trace=False)
    sample = torch.zeros((2, artifact.window, artifact.profile.n_features), dtype=torch.float32)
    torch.onnx.export(runner.forward, (sample,), str(out), input_names=["windows"], output_names=["scores"],
                      dynamic_axes={"windows": {0: "batch"}, "scores": {0: "batch"}})
    Path(str(out) + ".json").write_text(info)
    return out


def resolve_export_source(model_dir: str, version: str | None) -> Path:
    """The version directory to export: ``--version`` inside ``model_dir``, else what is served."""
    if version is None:
        return Path(model_dir)
    path = Path(model_dir) / version
    if not path.is_dir():
        raise ArtifactError(f"no version {version!r} in {model_dir}")
    return path
