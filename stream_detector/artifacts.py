"""Versioned model artifacts: safetensors weights plus JSON metadata, never pickle.

Layout of one version::

    <model_dir>/<version>/weights.safetensors
    <model_dir>/<version>/metadata.json   # profile, features, window, scaler, threshold, checksum

A version is written to a hidden temporary directory and renamed into place, so a worker watching
the directory never sees half an artifact. The weights' SHA-256 is recorded in the metadata and
checked on load: a tampered or truncated file is refused. ``content_sha256`` is a digest over the
canonical JSON of every other metadata entry (the weights' SHA-256 among them), so an edited
threshold, scaler or window is refused as well. With a signing key (a file kept outside the model
directory) the trainer adds ``signature``, an HMAC-SHA256 of ``content_sha256``; a loader given the
key refuses unsigned or wrongly signed artifacts.
"""

from __future__ import annotations

import hashlib
import hmac
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

FORMAT_VERSION = 2  # 2: content_sha256 covers the metadata too (format 1 covered the weights only)
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
    signing_key: bytes | None = None,
) -> Path:
    """Writes a new version under ``model_dir`` atomically and returns its directory.

    With ``signing_key`` the metadata carries an HMAC-SHA256 signature of its content digest.
    """
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
    metadata["content_sha256"] = content_digest(metadata)
    if signing_key is not None:
        metadata["signature"] = {"algorithm": "hmac-sha256", "value": sign_digest(metadata["content_sha256"],
                                                                                  signing_key)}
    (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))
    os.replace(tmp, final)
    return final


def resolve_version_dir(path: str | os.PathLike[str]) -> Path:
    """An artifact directory itself, or the version a model directory serves: its champion, or
    without aliases the newest complete version by metadata creation time (never by name)."""
    from .registry import served_candidates  # the registry builds on this module

    return served_candidates(path)[0]


def content_digest(metadata: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of the metadata minus its own digest and signature."""
    body = {k: v for k, v in metadata.items() if k not in UNDIGESTED_KEYS}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def sign_digest(digest: str, key: bytes) -> str:
    return hmac.new(key, digest.encode("ascii"), hashlib.sha256).hexdigest()


def read_signing_key(path: str | os.PathLike[str]) -> bytes:
    """The key file's bytes (surrounding whitespace stripped); an empty or missing file is an error."""
    try:
        key = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ArtifactError(f"cannot read signing key {path}: {exc.strerror or exc}") from None
    if not key:
        raise ArtifactError(f"signing key {path} is empty")
    return key


UNDIGESTED_KEYS = frozenset({"content_sha256", "signature"})


def verify_metadata(directory: Path, metadata: dict[str, Any], signing_key: bytes | None) -> None:
    """Refuses metadata whose content digest (or, given a key, signature) does not match."""
    recorded = metadata.get("content_sha256")
    try:
        actual = content_digest(metadata)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{directory}: metadata cannot be digested: {exc}") from None
    if not isinstance(recorded, str) or not hmac.compare_digest(recorded, actual):
        raise ArtifactError(f"{directory}: metadata checksum mismatch (content {actual[:12]}..., recorded "
                            f"{str(recorded)[:12]}...): metadata.json was modified; refusing to load")
    if signing_key is None:
        return
    signature = metadata.get("signature")
    if not isinstance(signature, dict) or signature.get("algorithm") != "hmac-sha256":
        raise ArtifactError(f"{directory}: artifact is not signed, and a signing key is configured; "
                            f"refusing to load (sign it with `trainer train --signing-key`)")
    if not hmac.compare_digest(str(signature.get("value", "")), sign_digest(actual, signing_key)):
        raise ArtifactError(f"{directory}: signature does not match the configured signing key; refusing to load")


def load_artifact(path: str | os.PathLike[str], signing_key: bytes | None = None) -> ModelArtifact:
    """Loads weights without pickle and checks them against the metadata before serving them.

    The metadata's own digest is checked too; with ``signing_key`` an HMAC signature is required.
    """
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
            + ("; format 1 does not protect its metadata (threshold, scaler) by a checksum: retrain it"
               if metadata.get("format_version") == 1 else "")
        )
    verify_metadata(directory, metadata, signing_key)
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
