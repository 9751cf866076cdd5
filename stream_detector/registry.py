"""Model registry: versions in a model directory plus named aliases (`champion`, `challenger`).

Follows MLflow's registry conventions: a version is immutable once written; an alias is a movable
name for one version. ``aliases.json`` holds the current aliases and their history, and is replaced
atomically (temporary file + rename), so a worker polling it never reads half a file. The worker
serves the champion. A directory of versions without aliases (the older layout) serves the newest
version by the ``created_at`` in its metadata, never by directory name.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from .artifacts import METADATA_FILE, ArtifactError, ModelArtifact, load_artifact

ALIASES_FILE = "aliases.json"
CHAMPION = "champion"
CHALLENGER = "challenger"


@dataclass(frozen=True)
class VersionInfo:
    """What `trainer models` lists about one version, read from its metadata (not verified)."""

    name: str
    path: Path
    created_at: str
    metadata: dict[str, Any]


def is_version_dir(path: Path) -> bool:
    return (path / METADATA_FILE).is_file()


def list_versions(model_dir: str | os.PathLike[str]) -> list[VersionInfo]:
    """Complete versions in ``model_dir``, oldest first by metadata creation time."""
    root = Path(model_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if not p.is_dir() or p.name.startswith(".") or not is_version_dir(p):
            continue
        try:
            meta = json.loads((p / METADATA_FILE).read_text())
        except (OSError, ValueError):
            meta = {}
        if not isinstance(meta, dict):
            meta = {}
        found.append(VersionInfo(p.name, p, str(meta.get("created_at", "")), meta))
    return sorted(found, key=lambda v: (v.created_at, v.name))


def read_aliases(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"aliases": {name: version}, "history": [...]}``; empty when there is no aliases file."""
    path = Path(model_dir) / ALIASES_FILE
    if not path.is_file():
        return {"aliases": {}, "history": []}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: unreadable aliases file: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("aliases"), dict):
        raise ArtifactError(f"{path}: aliases file has no `aliases` object")
    data.setdefault("history", [])
    return data


def _write_aliases(model_dir: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".aliases.", suffix=".tmp", dir=model_dir)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, model_dir / ALIASES_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def set_alias(model_dir: str | os.PathLike[str], alias: str, version: str,
              check: Callable[[Path], Any] | None = load_artifact) -> dict[str, Any]:
    """Points ``alias`` at ``version`` after ``check`` (by default a full load) accepts it."""
    root = Path(model_dir)
    target = root / version
    if not is_version_dir(target) or version.startswith("."):
        raise ArtifactError(f"no version {version!r} in {root}")
    if check is not None:
        check(target)  # raises ArtifactError: a version that does not load is never promoted
    data = read_aliases(root)
    previous = data["aliases"].get(alias)
    data["aliases"][alias] = version
    data["history"].append({"alias": alias, "version": version, "previous": previous,
                            "at": datetime.now(timezone.utc).isoformat()})
    _write_aliases(root, data)
    return data


def remove_alias(model_dir: str | os.PathLike[str], alias: str, reason: str | None = None) -> str | None:
    """Removes ``alias`` (a retired challenger, say); returns the version it named, None if unset."""
    root = Path(model_dir)
    data = read_aliases(root)
    previous = data["aliases"].pop(alias, None)
    if previous is None:
        return None
    entry: dict[str, Any] = {"alias": alias, "version": None, "previous": previous,
                             "at": datetime.now(timezone.utc).isoformat()}
    if reason:
        entry["reason"] = reason
    data["history"].append(entry)
    _write_aliases(root, data)
    return previous


def rollback(model_dir: str | os.PathLike[str], alias: str = CHAMPION,
             check: Callable[[Path], Any] | None = load_artifact) -> str:
    """Moves ``alias`` back to the version it pointed at before its current one; returns it."""
    root = Path(model_dir)
    data = read_aliases(root)
    current = data["aliases"].get(alias)
    if current is None:
        raise ArtifactError(f"{root}: no {alias} to roll back")
    # The version the alias held before the move that gave it its current one.
    for entry in reversed(data["history"]):
        if entry.get("alias") == alias and entry.get("version") == current:
            previous = entry.get("previous")
            break
    else:
        previous = None
    if not previous:
        raise ArtifactError(f"{root}: {alias} {current} has no previous version to roll back to")
    target = root / previous
    if check is not None:
        check(target)
    data["aliases"][alias] = previous
    # Recorded as the move back, with the one before `previous` so a second rollback goes further.
    before = None
    for entry in reversed(data["history"]):
        if entry.get("alias") == alias and entry.get("version") == previous:
            before = entry.get("previous")
            break
    data["history"].append({"alias": alias, "version": previous, "previous": before, "rollback_from": current,
                            "at": datetime.now(timezone.utc).isoformat()})
    _write_aliases(root, data)
    return previous


def champion_dir(model_dir: str | os.PathLike[str]) -> Path | None:
    """The champion's directory, or None when the directory has no champion alias."""
    root = Path(model_dir)
    version = read_aliases(root)["aliases"].get(CHAMPION)
    return None if version is None else root / version


def served_candidates(model_dir: str | os.PathLike[str]) -> list[Path]:
    """What the worker may serve, in order of preference.

    A version directory: itself. A directory with a champion: the champion only. Otherwise the
    versions newest first by metadata creation time (the first that loads is served).
    """
    root = Path(model_dir)
    if is_version_dir(root):
        return [root]
    if not root.is_dir():
        raise ArtifactError(f"no model at {root}: train one with `trainer train` first")
    champion = champion_dir(root)
    if champion is not None:
        return [champion]
    versions = list_versions(root)
    if not versions:
        raise ArtifactError(f"no model version in {root}: train one with `trainer train` first")
    return [v.path for v in reversed(versions)]


def load_served(model_dir: str | os.PathLike[str], signing_key: bytes | None = None,
                skip: set[str] | frozenset[str] = frozenset()) -> ModelArtifact:
    """Loads what :func:`served_candidates` prefers; a champion that fails is an error, not skipped."""
    candidates = served_candidates(model_dir)
    errors = []
    for path in candidates:
        if str(path) in skip:
            continue
        try:
            return load_artifact(path, signing_key=signing_key)
        except ArtifactError as exc:
            if len(candidates) == 1:
                raise
            errors.append(str(exc))
    raise ArtifactError(f"no loadable model version in {model_dir}: " + "; ".join(errors or ["all refused"]))
