"""`edgesmith diff A B`: what differs between two release bundles (folders or tarballs), from their manifests.

The comparison reads only manifest.json (streamed from a tarball, never extracted); run `edgesmith verify`
first to know that the files match their manifests. Differences in git state, host and package versions are
reported apart from the build's substance: they are expected between machines.

`--fail-on-change` gates on what defines the model: its files of every format, the recorded config, the eval set,
labels and preprocessing, and the JSON indexes (artifacts.json, sidecars) minus their measured fields. Measured
results (latency and accuracy in results/*.json, the reports, the model card, stage metrics, the budget verdict)
are listed but do not gate; `--max-accuracy-drop` gates on accuracy with a tolerance instead.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from .manifest import Manifest, parse_manifest
from .verify import VerifyError, open_bundle, read_manifest

ABSENT = "<absent>"
# Files that hold measurements of the model, not the model: they differ between two builds of identical models.
MEASURED_FILES = ("report.html", "report.md", "MODEL_CARD.md")
MEASURED_DIRS = ("results/",)
# Keys of the JSON indexes (artifacts.json, model sidecars) whose values are measured, at any depth.
MEASURED_KEYS = frozenset({"parity", "accuracy", "latency", "wall_time_s", "images_per_s", "peak_rss_mb", "top1",
                           "p50_ms", "p90_ms", "p99_ms", "timings", "measured"})
MAX_JSON_BYTES = 16 << 20


def is_measured_file(path: str) -> bool:
    """Reports, the model card and device-suite results: measured, shown by diff but never gating."""
    name = posixpath.basename(path)
    return (path in MEASURED_FILES or path.startswith(MEASURED_DIRS)
            or (name.startswith(("results-", "results_")) and name.endswith(".json")))


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
    # JSON indexes whose bytes differ only in measured fields (also in `changed`; they do not gate).
    measured_only: list[str] = field(default_factory=list)
    # (artifact key, accuracy in A, accuracy in B) for every artifact measured in both bundles.
    accuracy: list[tuple[str, float, float]] = field(default_factory=list)

    @property
    def substantive(self) -> bool:
        """True when config, metrics or files differ (environment differences alone do not count)."""
        return bool(self.config or self.metrics or self.added or self.removed or self.changed)

    def gating(self, paths: list[str]) -> list[str]:
        return [p for p in paths if not is_measured_file(p) and p not in self.measured_only]

    @property
    def model_changes(self) -> list[str]:
        """What defines the model and differs: config keys and files (weights, graphs, indexes, eval set)."""
        return ([f"config {k}" for k, _, _ in self.config] + [f"changed {p}" for p in self.gating(self.changed)]
                + [f"added {p}" for p in self.gating(self.added)] + [f"removed {p}" for p in self.gating(self.removed)])

    def accuracy_drops(self, tolerance: float) -> list[tuple[str, float, float]]:
        """Artifacts whose accuracy fell from A to B by more than `tolerance` (absolute, e.g. 0.005)."""
        return [(k, a, b) for k, a, b in self.accuracy if a - b > tolerance + 1e-12]


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
    changed = sorted(p for p in set(files_a) & set(files_b) if files_a[p] != files_b[p])
    acc_a, acc_b = _accuracies(ma), _accuracies(mb)
    return BundleDiff(
        Path(a), Path(b),
        config=_changes(ma.config, mb.config),
        metrics=_changes(_measured(ma), _measured(mb)),
        added=sorted(set(files_b) - set(files_a)),
        removed=sorted(set(files_a) - set(files_b)),
        changed=changed,
        environment=_changes(_environment(ma), _environment(mb)),
        rebuilt=sorted(n for n in set(ma.stages) | set(mb.stages)
                       if (ma.stages.get(n) and ma.stages[n].key) != (mb.stages.get(n) and mb.stages[n].key)),
        same_content=ma.content_sha256 == mb.content_sha256,
        measured_only=_measured_only(a, b, [p for p in changed if p.endswith(".json") and not is_measured_file(p)]),
        accuracy=[(k, acc_a[k], acc_b[k]) for k in sorted(set(acc_a) & set(acc_b))],
    )


def _measured_only(a: Path, b: Path, paths: list[str]) -> list[str]:
    """The JSON files among `paths` that are equal in A and B once their measured fields are left out."""
    if not paths:
        return []
    same = []
    with open_bundle(a) as bundle_a, open_bundle(b) as bundle_b:
        for path in paths:
            left, right = _read_json(bundle_a, path), _read_json(bundle_b, path)
            if left is not None and right is not None and _strip_measured(left) == _strip_measured(right):
                same.append(path)
    return same


def _read_json(bundle, path: str) -> Optional[Any]:
    try:
        if bundle.kinds.get(path) != "file" or bundle.size(path) > MAX_JSON_BYTES:
            return None
        return json.loads(bundle.read_bytes(path).decode("utf-8"))
    except (OSError, KeyError, UnicodeDecodeError, ValueError):
        return None


def _strip_measured(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_measured(v) for k, v in value.items() if k not in MEASURED_KEYS}
    if isinstance(value, list):
        return [_strip_measured(v) for v in value]
    return value


def _accuracies(m: Manifest) -> dict[str, float]:
    """Accuracy of each artifact as the manifest records it: the device suite's top-1 per target and runtime
    (stages.validate.metrics.artifacts), and the export stage's parity accuracy (stages.export.metrics.artifacts)."""
    found: dict[str, float] = {}
    validate = m.stages.get("validate")
    for row in (validate.metrics.get("artifacts") if validate else None) or []:
        if isinstance(row, dict) and _number(row.get("top1")):
            key = f"{row.get('artifact', '?')} on {row.get('target', '?')}/{row.get('runtime', '?')}"
            found[key] = float(row["top1"])
    export = m.stages.get("export")
    artifacts = (export.metrics.get("artifacts") if export else None) or {}
    if isinstance(artifacts, dict):
        for name, entry in artifacts.items():
            parity = entry.get("parity") if isinstance(entry, dict) else None
            if isinstance(parity, dict) and _number(parity.get("accuracy")):
                found[f"{name} (export parity)"] = float(parity["accuracy"])
    return found


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
    gating, measured = [], []
    for word, paths in (("changed", d.changed), ("added", d.added), ("removed", d.removed)):
        gates = set(d.gating(paths))
        for p in paths:
            note = "  (measured fields only)" if p in d.measured_only else ""
            (gating if p in gates else measured).append(f"{word:<8} {p}" + ("" if p in gates else note))
    lines += _section("artifacts changed (sha256; these gate --fail-on-change)", gating)
    lines += _section("measured files changed (results, reports, measured fields; shown, do not gate)", measured)
    lines += _section("environment (expected to differ between machines)",
                      [f"{k}: {_show(x)} -> {_show(y)}" for k, x, y in d.environment])
    return "\n".join(lines) + "\n"


def _section(title: str, rows: list[str]) -> list[str]:
    return [f"\n{title}: none"] if not rows else [f"\n{title} ({len(rows)}):", *(f"  {r}" for r in rows)]


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return json.dumps(value) if not isinstance(value, str) else value
