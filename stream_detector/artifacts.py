"""Versioned model artifacts: safetensors weights plus JSON metadata, never pickle.

Layout of one version::

    <model_dir>/<version>/weights.safetensors
    <model_dir>/<version>/metadata.json   # profile, features, window, scaler, threshold, checksum

A version is written to a hidden temporary directory and renamed into place, so a worker watching
the directory never sees half an artifact. The weights' SHA-256 is recorded in the metadata and
checked on load: a tampered or truncated file is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .models import AnomalyModel, build_model
from .preprocessing import Preprocessor, ScalerParams
from .profiles import Profile, profile_from_config

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
METADATA_FILE = "metadata.json"


class ArtifactError(Exception):
    """An artifact that cannot be served: missing, tampered, or incompatible."""


@dataclass
class ModelArtifact:
    path: Path
    version: str
    metadata: dict[str, Any]
    profile: Profile
    window: int
    model: AnomalyModel
    scaler: ScalerParams
    threshold: float

    @property
    def kind(self) -> str:
        return self.model.kind

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.profile.feature_names

    def preprocessor(self) -> Preprocessor:
        return Preprocessor(self.scaler)


def new_version() -> str:
    """Sortable by time, unique across concurrent trainers."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def save_artifact(
    model_dir: str | os.PathLike[str],
    model: AnomalyModel,
    profile: Profile,
    scaler: ScalerParams,
    threshold: dict[str, Any],
    training: dict[str, Any] | None = None,
    version: str | None = None,
) -> Path:
    """Writes a new version under ``model_dir`` atomically and returns its directory."""
    root = Path(model_dir)
    root.mkdir(parents=True, exist_ok=True)
    version = version or new_version()
    final = root / version
    if final.exists():
        raise ArtifactError(f"version {version} already exists in {root}")
    tmp = root / f".{version}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS_FILE))
    metadata = {
        "format_version": FORMAT_VERSION,
        "version": version,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "model": {"kind": model.kind, "config": model.config()},
        "profile": profile.to_config(),
        "fields": [{"name": f.name, "kind": f.kind} for f in profile.fields],
        "features": list(profile.feature_names),
        "window": model.window,
        "scaler": scaler.to_dict(),
        "threshold": threshold,
        "training": training or {},
        "weights_sha256": _sha256(tmp / WEIGHTS_FILE),
    }
    (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))
    os.replace(tmp, final)
    return final


def resolve_version_dir(path: str | os.PathLike[str]) -> Path:
    """An artifact directory itself, or the newest complete version inside a model directory."""
    path = Path(path)
    if (path / METADATA_FILE).is_file():
        return path
    if not path.is_dir():
        raise ArtifactError(f"no model at {path}: train one with `trainer train` first")
    versions = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")
                      and (p / METADATA_FILE).is_file())
    if not versions:
        raise ArtifactError(f"no model version in {path}: train one with `trainer train` first")
    return versions[-1]


def load_artifact(path: str | os.PathLike[str]) -> ModelArtifact:
    """Loads weights without pickle and checks them against the metadata before serving them."""
    directory = resolve_version_dir(path)
    try:
        metadata = json.loads((directory / METADATA_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{directory}: unreadable metadata: {exc}") from None
    if not isinstance(metadata, dict):
        raise ArtifactError(f"{directory}: metadata is not a JSON object")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{directory}: artifact format {metadata.get('format_version')!r} is not supported "
            f"(this worker reads format {FORMAT_VERSION})"
        )
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ArtifactError(f"{directory}: {WEIGHTS_FILE} is missing")
    digest = _sha256(weights)
    if digest != metadata.get("weights_sha256"):
        raise ArtifactError(f"{directory}: weights checksum mismatch (file {digest[:12]}..., "
                            f"metadata {str(metadata.get('weights_sha256'))[:12]}...); refusing to load")
    try:
        profile = profile_from_config(metadata["profile"])
        model = build_model(metadata["model"]["kind"], metadata["model"]["config"])
        state = load_file(str(weights), device="cpu")
        model.load_state_dict(state, strict=True)
        scaler = ScalerParams.from_dict(metadata["scaler"])
        threshold = float(metadata["threshold"]["value"])
        version = str(metadata["version"])
        window = int(metadata["window"])
    except Exception as exc:  # anything wrong inside an artifact means: do not serve it
        raise ArtifactError(f"{directory}: incompatible artifact: {type(exc).__name__}: {exc}") from None
    if list(profile.feature_names) != list(metadata.get("features", [])) or model.n_features != profile.n_features:
        raise ArtifactError(f"{directory}: feature list does not match the profile {profile.name!r}")
    model.eval()
    return ModelArtifact(
        path=directory,
        version=version,
        metadata=metadata,
        profile=profile,
        window=window,
        model=model,
        scaler=scaler,
        threshold=threshold,
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
