"""`edgesmith diff A B`: what differs between two release bundles (folders or tarballs), from their manifests.

The comparison reads only manifest.json (streamed from a tarball, never extracted); run `edgesmith verify`
first to know that the files match their manifests. Differences in git state, host and package versions are
reported apart from the build's substance: they are expected between machines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .manifest import Manifest, parse_manifest
from .verify import VerifyError, open_bundle, read_manifest

ABSENT = "<absent>"


@dataclass
class BundleDiff:
    a: Path
    b: Path
    config: list[tuple[str, Any, Any]] = field(default_factory=list)
    metrics: list[tuple[str, Any, Any]] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    environment: list[tuple[str, Any, Any]] = field(default_factory=list)
    rebuilt: list[str] = field(default_factory=list)
    same_content: bool = False

    @property
    def substantive(self) -> bool:
        """True when config, metrics or files differ (environment differences alone do not count)."""
        return bool(self.config or self.metrics or self.added or self.removed or self.changed)


def load_manifest(path: Path) -> Manifest:
    """The validated manifest of a bundle; VerifyError listing the problems if it is absent or malformed."""
    with open_bundle(path) as bundle:
        raw, problems = read_manifest(bundle)
    if problems:
        raise VerifyError(f"{path}: cannot compare it, its manifest is unusable:\n  - " + "\n  - ".join(problems),
                          "\nPass a release bundle (folder or .tar.gz) and run `edgesmith verify` on it.")
    return parse_manifest(raw)


def diff_bundles(a: Path, b: Path) -> BundleDiff:
    ma, mb = load_manifest(a), load_manifest(b)
    files_a = {f.path: f.sha256 for f in ma.files}
    files_b = {f.path: f.sha256 for f in mb.files}
    return BundleDiff(
        Path(a), Path(b),
        config=_changes(ma.config, mb.config),
        metrics=_changes(_measured(ma), _measured(mb)),
        added=sorted(set(files_b) - set(files_a)),
        removed=sorted(set(files_a) - set(files_b)),
        changed=sorted(p for p in set(files_a) & set(files_b) if files_a[p] != files_b[p]),
        environment=_changes(_environment(ma), _environment(mb)),
        rebuilt=sorted(n for n in set(ma.stages) | set(mb.stages)
                       if (ma.stages.get(n) and ma.stages[n].key) != (mb.stages.get(n) and mb.stages[n].key)),
        same_content=ma.content_sha256 == mb.content_sha256,
    )


def _measured(m: Manifest) -> dict:
    # Paths as in manifest.json, so `jq .stages.distill.metrics` finds what diff names.
    return {"stages": {name: {"metrics": s.metrics} for name, s in m.stages.items()},
            "budget_verdict": m.budget_verdict}


def _environment(m: Manifest) -> dict:
    return {"source": m.source.model_dump(), "host": m.host.model_dump(), "packages": m.packages}


def _changes(a: Any, b: Any) -> list[tuple[str, Any, Any]]:
    flat_a, flat_b = dict(_flatten(a)), dict(_flatten(b))
    return [(k, flat_a.get(k, ABSENT), flat_b.get(k, ABSENT)) for k in sorted(set(flat_a) | set(flat_b))
            if flat_a.get(k, ABSENT) != flat_b.get(k, ABSENT)]


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Key paths to leaf values; lists of scalars stay one value (e.g. the subtask's classes)."""
    if isinstance(value, dict) and value:
        for key in value:
            yield from _flatten(value[key], f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list) and value and any(isinstance(v, (dict, list)) for v in value):
        for i, item in enumerate(value):
            yield from _flatten(item, f"{prefix}[{i}]")
    else:
        yield prefix, value


def delta(a: Any, b: Any) -> str:
    if _number(a) and _number(b):
        d = b - a
        rel = f" ({d / a:+.1%})" if a else ""
        return f"{d:+.6g}{rel}"
    return ""


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def render_diff(d: BundleDiff) -> str:
    lines = [f"A: {d.a}", f"B: {d.b}"]
    if d.same_content:
        lines.append("Payload identical (same content_sha256).")
    lines += _section("stages with different keys (rebuilt)", d.rebuilt)
    lines += _section("config differences", [f"{k}: {_show(x)} -> {_show(y)}" for k, x, y in d.config])
    lines += _section("metric differences (B - A)",
                      [f"{k}: {_show(x)} -> {_show(y)}  {delta(x, y)}".rstrip() for k, x, y in d.metrics])
    lines += _section("artifacts changed (sha256)", [f"changed  {p}" for p in d.changed]
                      + [f"added    {p}" for p in d.added] + [f"removed  {p}" for p in d.removed])
    lines += _section("environment (expected to differ between machines)",
                      [f"{k}: {_show(x)} -> {_show(y)}" for k, x, y in d.environment])
    return "\n".join(lines) + "\n"


def _section(title: str, rows: list[str]) -> list[str]:
    return [f"\n{title}: none"] if not rows else [f"\n{title} ({len(rows)}):", *(f"  {r}" for r in rows)]


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return json.dumps(value) if not isinstance(value, str) else value
