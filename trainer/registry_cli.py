"""`trainer` subcommands of the model registry: promote, rollback, models, export; train's registry flags."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stream_detector.artifacts import ArtifactError, load_artifact, read_signing_key
from stream_detector.registry import (
    CHALLENGER, CHAMPION, list_versions, read_aliases, rollback, set_alias,
)


def _registry_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--promote", action="store_true",
                   help="make the new version the champion (the first version of a directory always is)")
    p.add_argument("--signing-key", metavar="PATH",
                   help="HMAC-SHA256 key file (outside the model directory) to sign the artifact with")


def _signing_key(args: argparse.Namespace) -> bytes | None:
    path = getattr(args, "signing_key", None)
    return read_signing_key(path) if path else None


def _register_trained(args: argparse.Namespace, path: Path) -> None:
    """A new version becomes champion only when asked, or when the directory has none yet."""
    root, version = path.parent, path.name
    has_champion = CHAMPION in read_aliases(root)["aliases"]
    if args.promote or not has_champion:
        set_alias(root, CHAMPION, version, check=lambda p: load_artifact(p, signing_key=_signing_key(args)))
        print(f"registered {version} as {CHAMPION}" + ("" if has_champion else " (first version)"))
    else:
        print(f"registered {version}; the champion is unchanged (`trainer promote {version} "
              f"--model-dir {root}` to serve it)")


def _key_for(args: argparse.Namespace) -> bytes | None:
    return read_signing_key(args.signing_key) if args.signing_key else None


def cmd_promote(args: argparse.Namespace) -> int:
    key = _key_for(args)
    try:
        data = set_alias(args.model_dir, args.alias, args.version, check=lambda p: load_artifact(p, signing_key=key))
    except ArtifactError as exc:
        print(f"trainer: not promoted: {exc}", file=sys.stderr)
        return 1
    print(f"{args.alias} -> {data['aliases'][args.alias]}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    key = _key_for(args)
    try:
        version = rollback(args.model_dir, args.alias, check=lambda p: load_artifact(p, signing_key=key))
    except ArtifactError as exc:
        print(f"trainer: not rolled back: {exc}", file=sys.stderr)
        return 1
    print(f"{args.alias} -> {version}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    try:
        aliases = read_aliases(args.model_dir)["aliases"]
    except ArtifactError as exc:
        print(f"trainer: {exc}", file=sys.stderr)
        return 1
    by_version: dict[str, list[str]] = {}
    for alias, version in sorted(aliases.items()):
        by_version.setdefault(version, []).append(alias)
    versions = list_versions(args.model_dir)
    if not versions:
        print(f"no model version in {args.model_dir}")
        return 1
    print(f"{'version':28s} {'created':26s} {'kind':16s} {'profile':13s} {'threshold':>10s}  aliases")
    for v in versions:
        meta = v.metadata
        threshold = (meta.get("threshold") or {}).get("value")
        print(f"{v.name:28s} {v.created_at[:26]:26s} {str((meta.get('model') or {}).get('kind', '?')):16s} "
              f"{str((meta.get('profile') or {}).get('name', '?')):13s} "
              f"{threshold if threshold is None else format(float(threshold), '.4g'):>10}  "
              f"{','.join(by_version.get(v.name, []))}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from trainer.export import ExportError, export_model, resolve_export_source

    try:
        source = resolve_export_source(args.model_dir, args.version)
        out = export_model(source, args.format, args.out, signing_key=_key_for(args))
    except (ArtifactError, ExportError) as exc:
        print(f"trainer: not exported: {exc}", file=sys.stderr)
        return 1
    print(f"exported {source} as {args.format} to {out}")
    return 0


def add_registry_commands(sub) -> None:
    p = sub.add_parser("promote", help="point an alias (champion by default) at a version, once it loads")
    p.add_argument("version")
    p.add_argument("--model-dir", default="artifacts/model")
    p.add_argument("--alias", default=CHAMPION, choices=[CHAMPION, CHALLENGER])
    p.add_argument("--signing-key", metavar="PATH", help="also require a valid signature with this key")
    p.set_defaults(func=cmd_promote)

    r = sub.add_parser("rollback", help="return an alias (champion by default) to its previous version")
    r.add_argument("--model-dir", default="artifacts/model")
    r.add_argument("--alias", default=CHAMPION, choices=[CHAMPION, CHALLENGER])
    r.add_argument("--signing-key", metavar="PATH", help="also require a valid signature with this key")
    r.set_defaults(func=cmd_rollback)

    m = sub.add_parser("models", help="list the versions of a model directory with their aliases")
    m.add_argument("--model-dir", default="artifacts/model")
    m.set_defaults(func=cmd_models)

    x = sub.add_parser("export", help="write a version as TorchScript or ONNX (preprocessing included)")
    x.add_argument("--model-dir", default="artifacts/model")
    x.add_argument("--version", help="version to export (default: the one the worker serves)")
    x.add_argument("--format", required=True, choices=["torchscript", "onnx"])
    x.add_argument("--out", required=True, help="file to write")
    x.add_argument("--signing-key", metavar="PATH", help="also require a valid signature with this key")
    x.set_defaults(func=cmd_export)
