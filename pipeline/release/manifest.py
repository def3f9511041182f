"""manifest.json: what a release bundle holds and how it was made. Schema documented in docs/reproducibility.md.

Everything in the manifest is a function of the build's inputs, except the `source` (git) and `host` sections,
which describe the machine that assembled the bundle. No wall-clock time is recorded anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..cache import CODE_PACKAGES, PROJECT_ROOT, config_sha256, sha256_file

MANIFEST_NAME = "manifest.json"
SCHEMA_ID = "edgesmith.release.manifest"
SCHEMA_VERSION = 1
# Packages whose versions decide what the artifacts contain or how they were measured.
RECORDED_PACKAGES = ("torch", "torchvision", "timm", "numpy", "nncf", "onnx", "onnxruntime", "openvino",
                     "polygraphy", "tensorrt")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Strict):
    path: str = Field(min_length=1, description="POSIX path relative to the bundle root")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class StageEntry(_Strict):
    key: str = Field(min_length=1)
    device: Optional[str] = None
    seed: Optional[int] = None
    versions: dict[str, str] = {}
    metrics: dict[str, Any] = {}


class SourceState(_Strict):
    git_commit: str
    git_dirty: Union[bool, Literal["unknown"]]


class HostInfo(_Strict):
    platform: str
    machine: str
    cpu: str
    cores: int = Field(ge=0)
    python: str


class Manifest(_Strict):
    """Version 1 of the release manifest. Bump SCHEMA_VERSION on any incompatible change."""

    schema_: Literal["edgesmith.release.manifest"] = Field(SCHEMA_ID, alias="schema")
    schema_version: Literal[1] = SCHEMA_VERSION
    build: str
    version: str
    seed: int
    source_date_epoch: int = Field(ge=0)
    files: list[FileEntry]
    content_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    missing: list[str] = []
    config: dict[str, Any]
    config_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    stages: dict[str, StageEntry]
    measurement_conditions: dict[str, dict[str, Any]] = {}
    budgets: list[dict[str, Any]] = []
    budget_verdict: Literal["pass", "fail", "unknown", "none"] = "none"
    packages: dict[str, str]
    source: SourceState
    host: HostInfo

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def file_entries(folder: Path, exclude: tuple[str, ...] = (MANIFEST_NAME,)) -> list[FileEntry]:
    """Every regular file under `folder`, sorted by path, with its sha256 and size."""
    entries = []
    for rel in regular_files(folder):
        if rel not in exclude:
            path = folder / rel
            entries.append(FileEntry(path=rel, sha256=sha256_file(path), size=path.stat().st_size))
    return entries


def regular_files(folder: Path) -> list[str]:
    """Sorted POSIX paths of the regular files under `folder`; symlinks are neither followed nor listed."""
    found = []
    for top, _dirs, files in os.walk(folder, followlinks=False):
        for name in files:
            path = Path(top) / name
            if path.is_file() and not path.is_symlink():
                found.append(path.relative_to(folder).as_posix())
    return sorted(found)


def content_digest(files: list[FileEntry]) -> str:
    """One hash for the bundle's payload, independent of the machine that assembled it."""
    lines = "".join(f"{e.sha256}  {e.path}\n" for e in sorted(files, key=lambda e: e.path))
    return hashlib.sha256(lines.encode()).hexdigest()


PASS_FLAGS = ("passed", "ok", "met")  # the names a budget record may give its verdict


def budget_passed(budget: dict) -> bool | None:
    """A budget record's verdict, whichever flag name it uses; None if it has none."""
    flag = next((budget[k] for k in PASS_FLAGS if k in budget), None)
    return flag if isinstance(flag, bool) else None


def budget_verdict(budgets: list[dict]) -> str:
    """'pass' if every budget passed, 'fail' if one failed, 'unknown' if one has no verdict, 'none' if empty."""
    verdicts = [budget_passed(b) for b in budgets]
    if not verdicts:
        return "none"
    if False in verdicts:
        return "fail"
    return "unknown" if None in verdicts else "pass"


# What a build runs: a change here, committed or not, changes what the commit alone would reproduce.
SOURCE_PATHS = (*CODE_PACKAGES, "pyproject.toml", "constraints.txt")


def git_state(root: Path = PROJECT_ROOT, paths: tuple[str, ...] = SOURCE_PATHS) -> SourceState:
    """The project's commit, and whether `paths` (by default the code a build runs) differ from it (edits or new
    untracked files); 'unknown' without git, or when the code is not a git checkout itself (e.g. installed into
    site-packages)."""
    unknown = SourceState(git_commit="unknown", git_dirty="unknown")
    top = _git(root, "rev-parse", "--show-toplevel")
    commit = _git(root, "rev-parse", "HEAD")
    # A non-editable install inside some repository would otherwise report that repository's commit.
    if top is None or commit is None or Path(top).resolve() != root.resolve():
        return unknown
    status = _git(root, "status", "--porcelain", "--", *paths)
    return SourceState(git_commit=commit, git_dirty="unknown" if status is None else bool(status))


def _git(root: Path, *args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def host_info() -> HostInfo:
    return HostInfo(platform=platform.platform(), machine=platform.machine(), cpu=_cpu_model(),
                    cores=os.cpu_count() or 0, python=platform.python_version())


def _cpu_model() -> str:
    # platform.processor() is often empty on Linux; /proc/cpuinfo names the model.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def to_json(manifest: Manifest) -> str:
    """Canonical text: sorted keys, fixed indentation, trailing newline; the same manifest gives the same bytes."""
    return json.dumps(manifest.model_dump(mode="json", by_alias=True), indent=2, sort_keys=True,
                      ensure_ascii=False) + "\n"


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    return write_text_atomic(folder / MANIFEST_NAME, to_json(manifest))


def write_text_atomic(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def schema_problems(raw: Any) -> list[str]:
    """Every way `raw` (parsed JSON) breaks the manifest schema, each with its key path; empty if it conforms."""
    if not isinstance(raw, dict):
        return [f"manifest: must be a JSON object, not {type(raw).__name__}"]
    if raw.get("schema") != SCHEMA_ID or raw.get("schema_version") != SCHEMA_VERSION:
        return [f"manifest: schema is {raw.get('schema')!r} version {raw.get('schema_version')!r}; "
                f"this edgesmith reads {SCHEMA_ID!r} version {SCHEMA_VERSION}"]
    try:
        Manifest.model_validate(raw)
    except ValidationError as exc:
        return [f"manifest.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()]
    return []


def parse_manifest(raw: Any) -> Manifest:
    """A validated Manifest; assumes schema_problems(raw) is empty."""
    return Manifest.model_validate(raw)


__all__ = ["MANIFEST_NAME", "Manifest", "FileEntry", "StageEntry", "SourceState", "HostInfo", "file_entries",
           "content_digest", "budget_verdict", "git_state", "host_info", "to_json", "write_manifest",
           "schema_problems", "parse_manifest", "config_sha256"]
