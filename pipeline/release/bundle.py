"""Assemble a release bundle from the export and validate outputs: copy, describe, hash, pack.

Library functions over plain folders and dicts, so they can be used (and tested) without running the stages.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..cache import sha256_file
from ..errors import EdgesmithError
from .manifest import (
    HostInfo,
    Manifest,
    SourceState,
    StageEntry,
    budget_verdict,
    config_sha256,
    content_digest,
    file_entries,
    write_manifest,
    write_text_atomic,
)
from .model_card import CardFacts, render_model_card
from .tarball import unsafe_name, write_tarball

REQUIRED_EXPORT_FILES = ("model.onnx",)
OPTIONAL_EXPORT_FILES = ("model.int8.onnx", "openvino/model.xml", "openvino/model.bin", "openvino/model.int8.xml",
                         "openvino/model.int8.bin", "artifacts.json")
EVAL_SET = "eval.npz"
TENSORRT_DIR = "tensorrt"
REPORT_FILES = ("report.html", "report.md")
DEVICE_TESTS_SUFFIXES = (".py", ".ini", ".md", ".cfg", ".toml", ".txt")
BUNDLE_DIR = "bundle"


class ReleaseError(EdgesmithError):
    """The release cannot be assembled from the stage outputs."""


@dataclass(frozen=True)
class ReleaseSources:
    """Where the bundle's files come from."""

    export_dir: Path
    validate_dir: Optional[Path]
    device_tests_dir: Optional[Path]
    include_eval_set: bool = True


@dataclass(frozen=True)
class ReleaseInfo:
    """Everything the manifest says besides the file list."""

    build: str
    version: str
    seed: int
    source_date_epoch: int
    config: dict[str, Any]
    stages: dict[str, StageEntry]
    budgets: list[dict[str, Any]]
    packages: dict[str, str]
    source: SourceState
    host: HostInfo
    intended_use: Optional[str] = None


@dataclass
class ReleaseOutput:
    bundle_dir: Path
    tarball: Path
    manifest: Manifest
    missing: list[str] = field(default_factory=list)


def assemble_release(out: Path, sources: ReleaseSources, info: ReleaseInfo,
                     sign: Optional[Callable[[Path], Any]] = None) -> ReleaseOutput:
    """Write `out/bundle/` and `out/<build>-<version>.tar.gz`; the same inputs give the same bytes (except a
    signature, `sign(bundle)` after the manifest: ECDSA signatures differ from one signing to the next)."""
    bundle = out / BUNDLE_DIR
    bundle.mkdir(parents=True, exist_ok=False)
    missing = copy_payload(bundle, sources)
    artifacts_index = _read_json(bundle / "artifacts.json")
    conditions = measurement_conditions(bundle)
    write_derived_files(bundle, artifacts_index, info)
    write_text_atomic(bundle / "MODEL_CARD.md",
                      render_model_card(_card_facts(info, artifacts_index, missing, conditions)))
    manifest = build_manifest(bundle, info, missing, conditions)
    write_manifest(bundle, manifest)
    if sign is not None:
        sign(bundle)
    name = f"{info.build}-{info.version}"
    tarball = write_tarball(bundle, out / f"{name}.tar.gz", name, info.source_date_epoch)
    return ReleaseOutput(bundle, tarball, manifest, missing)


def build_manifest(bundle: Path, info: ReleaseInfo, missing: list[str],
                   conditions: Optional[dict[str, dict]] = None) -> Manifest:
    files = file_entries(bundle)
    return Manifest(
        build=info.build, version=info.version, seed=info.seed, source_date_epoch=info.source_date_epoch,
        files=files, content_sha256=content_digest(files), missing=sorted(missing),
        config=info.config, config_sha256=config_sha256(info.config), stages=info.stages,
        measurement_conditions=conditions or {}, budgets=info.budgets, budget_verdict=budget_verdict(info.budgets),
        packages=info.packages, source=info.source, host=info.host,
    )


def copy_payload(bundle: Path, sources: ReleaseSources) -> list[str]:
    """Copy what exists into the bundle; return the bundle paths that were expected but absent."""
    export = sources.export_dir
    for rel in REQUIRED_EXPORT_FILES:
        if not (export / rel).is_file():
            raise ReleaseError(
                f"The export output {export} has no {rel}; a release needs at least the FP32 ONNX model.",
                "Re-run the export stage (`edgesmith build CONFIG --force export`) and check its log for errors.")
    wanted = [*REQUIRED_EXPORT_FILES, *OPTIONAL_EXPORT_FILES, *_listed_artifacts(export)]
    if sources.include_eval_set:
        wanted.append(EVAL_SET)
    missing = [rel for rel in dict.fromkeys(wanted) if not _copy_file(export / rel, bundle / rel)]
    if not _copy_tree(export / TENSORRT_DIR, bundle / TENSORRT_DIR, suffixes=None):
        missing.append(f"{TENSORRT_DIR}/")
    missing += _copy_validation(bundle, sources.validate_dir)
    if sources.device_tests_dir is None or not _copy_tree(sources.device_tests_dir, bundle / "device_tests",
                                                          suffixes=DEVICE_TESTS_SUFFIXES):
        missing.append("device_tests/")
    return sorted(missing)


def _listed_artifacts(export: Path) -> list[str]:
    """Files named in artifacts.json (each artifact, its sidecar, an IR's weights, TFLM's C sources), if they are safe relative
    paths: the index is not trusted blindly."""
    from exporters.artifacts import ArtifactListing

    index = _read_json(export / "artifacts.json") or {}
    return [f for f in ArtifactListing.from_json(index).shipped_files() if unsafe_name(f) is None]


def _copy_validation(bundle: Path, validate_dir: Optional[Path]) -> list[str]:
    if validate_dir is None:
        return [*REPORT_FILES, "results/"]
    missing = [rel for rel in REPORT_FILES if not _copy_file(validate_dir / rel, bundle / rel)]
    results = sorted(validate_dir.glob("results*.json"))
    for path in results:
        _copy_file(path, bundle / "results" / path.name)
    return missing + ([] if results else ["results/"])


def _copy_file(src: Path, dst: Path) -> bool:
    if not src.is_file() or src.is_symlink():
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    # copyfile, not copy2: file metadata (mtime, owner) must not leak into the bundle.
    shutil.copyfile(src, dst)
    if src.stat().st_mode & 0o100:
        dst.chmod(0o755)
    return True


def _copy_tree(src: Path, dst: Path, suffixes: Optional[tuple[str, ...]]) -> bool:
    """Copy regular files under src (skipping caches and links); False if there was nothing to copy."""
    if not src.is_dir():
        return False
    copied = False
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if "__pycache__" in rel.parts or any(p.startswith(".") for p in rel.parts):
            continue
        if suffixes is None or path.suffix in suffixes:
            copied |= _copy_file(path, dst / rel)
    return copied


def write_derived_files(bundle: Path, artifacts_index: Optional[dict], info: ReleaseInfo) -> None:
    """labels.txt and preprocessing.json: what a device needs to feed the model and read its output."""
    index = artifacts_index or {}
    labels = index.get("class_names") or _subtask_class_names(info)
    write_text_atomic(bundle / "labels.txt", "".join(f"{name}\n" for name in labels))
    if isinstance(index.get("preprocessing"), dict):
        write_text_atomic(bundle / "preprocessing.json",
                          json.dumps(index["preprocessing"], indent=2, sort_keys=True) + "\n")


def _subtask_class_names(info: ReleaseInfo) -> list[str]:
    return [str(c) for c in info.config.get("subtask", {}).get("classes", [])]


# Keys of one device-suite run that say how it was measured (the rest are the measurements).
RUN_CONDITION_KEYS = ("artifact", "runtime", "runtime_version", "threads", "precision_hint", "providers",
                      "input_shape")


def measurement_conditions(bundle: Path) -> dict[str, dict]:
    """For each results file of the device suite: the machine, the settings and each run's runtime, so every
    measured number in the bundle can be read with the conditions it was measured under."""
    conditions = {}
    for path in sorted((bundle / "results").glob("*.json")):
        results = _read_json(path) or {}
        runs = [{k: run[k] for k in RUN_CONDITION_KEYS if k in run}
                for run in results.get("runs", []) if isinstance(run, dict)]
        entry = {k: results[k] for k in ("environment", "settings") if isinstance(results.get(k), dict)}
        if runs:
            entry["runs"] = runs
        if entry:
            conditions[path.relative_to(bundle).as_posix()] = entry
    return conditions


def _card_facts(info: ReleaseInfo, artifacts_index: Optional[dict], missing: list[str],
                conditions: dict[str, dict]) -> CardFacts:
    index = artifacts_index or {}
    return CardFacts(
        build=info.build, version=info.version, config=info.config,
        class_names=[str(c) for c in (index.get("class_names") or _subtask_class_names(info))],
        artifacts=[a for a in index.get("artifacts", []) if isinstance(a, dict)],
        stages=info.stages, budgets=info.budgets, verdict=budget_verdict(info.budgets),
        intended_use=info.intended_use, missing=missing, conditions=conditions,
    )


def _read_json(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def tarball_sha256(path: Path) -> str:
    return sha256_file(path)
