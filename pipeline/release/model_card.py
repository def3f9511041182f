"""MODEL_CARD.md: what the model is for, where it came from, how well it does and where it does not apply.

Rendered only from the build's recorded facts (config, stage metrics, artifacts index), never from the clock or
the machine, so the card is as reproducible as the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from .manifest import StageEntry, budget_passed

METRIC_STAGES = ("teacher", "adapt", "distill", "qat", "export", "validate")
# The card shows these; artifacts.json has the rest (sidecars, op counts, runtime options).
ARTIFACT_COLUMNS = ("file", "format", "precision", "runtime", "size", "parity")


@dataclass(frozen=True)
class CardFacts:
    build: str
    version: str
    config: dict[str, Any]
    class_names: list[str]
    artifacts: list[dict[str, Any]]
    stages: dict[str, StageEntry]
    budgets: list[dict[str, Any]]
    verdict: str
    intended_use: Optional[str] = None
    missing: list[str] = field(default_factory=list)
    conditions: dict[str, dict[str, Any]] = field(default_factory=dict)


def render_model_card(facts: CardFacts) -> str:
    sections = [
        _failed_validation_warning(facts),
        f"# Model card: {facts.build} {facts.version}\n",
        _intended_use(facts),
        _origin(facts),
        _artifacts(facts),
        _metrics(facts),
        _budgets(facts),
        _limits(facts),
    ]
    return "\n".join(s for s in sections if s).rstrip("\n") + "\n"


def _failed_validation_warning(facts: CardFacts) -> str:
    """The card's first line when the build shipped a failed validation (release.allow_failed_validation)."""
    if facts.verdict != "fail":
        return ""
    missed = sum(1 for b in facts.budgets if budget_passed(b) is False)
    return (f"**WARNING: this release FAILED validation ({missed} of {len(facts.budgets)} checks missed); it was cut "
            "only because release.allow_failed_validation is true. Do not deploy it as a validated model.**\n")


def _intended_use(facts: CardFacts) -> str:
    classes = ", ".join(f"`{c}`" for c in facts.class_names) or "(none recorded)"
    text = facts.intended_use or (
        f"Classifies an image as one of {len(facts.class_names)} classes: {classes}. "
        "It is meant for inputs that are known to belong to one of these classes, on the device it was "
        "validated for (see Metrics)."
    )
    return f"## Intended use\n\n{text}\n\nClasses, in output order: {classes}.\n"


def _origin(facts: CardFacts) -> str:
    teacher = facts.config.get("teacher", {}) or {}
    student = facts.config.get("student", {}) or {}
    data = facts.config.get("data", {}) or {}
    name = teacher.get("name") or (teacher.get("train", {}) or {}).get("arch") or "unnamed"
    lines = [
        "## How it was made\n",
        f"- Teacher: `{name}` (source: {teacher.get('source', 'unknown')}"
        + (f", weights: `{teacher['weights']}`" if teacher.get("weights") else "")
        + f", adaptation: {(teacher.get('adapt', {}) or {}).get('method', 'none')}).",
        _student_line(facts, student),
        f"- Data: `{data.get('dataset', 'unknown')}`, restricted to the subtask classes; validation fraction "
        f"{data.get('val_fraction', 'n/a')}, training images per class: {data.get('train_per_class') or 'all'}, "
        f"test images per class: {data.get('test_per_class') or 'all'}.",
        *_label_budget(data),
        f"- Seed: {(facts.config.get('build', {}) or {}).get('seed', 'n/a')}. The full resolved config is in "
        "manifest.json (`config`, hash `config_sha256`).",
    ]
    return "\n".join(lines) + "\n"


def _student_line(facts: CardFacts, student: dict) -> str:
    method = (facts.config.get("distill", {}) or {}).get("method", "see config")
    distill = facts.stages.get("distill")
    searched = (distill.metrics if distill is not None else {}).get("search")
    if not searched:
        return f"- Student: `{student.get('arch', 'unknown')}`, distilled from the teacher on the subtask (method: {method})."
    return (f"- Student: `{searched['arch']}` at {searched['resolution']} px, found by the student search among "
            f"{searched['candidates']} candidates: the {searched['why']}; distilled from the teacher on the subtask "
            f"(method: {method}).")


def _label_budget(data: dict) -> list[str]:
    """A line only for builds with a label budget or a pool (every other card stays as it was)."""
    if all(data.get(k) is None for k in ("labels_per_class", "unlabelled", "labels_file")):
        return []
    n, file = data.get("labels_per_class"), data.get("labels_file")
    labels = (f"{n} labelled training images per subtask class (of which a small share held out for model "
              "selection; no other label was used)" if n is not None else "every training label")
    if file is not None:
        labels = (f"the labelled training images listed in `{Path(file).name}` (of which a small share per class "
                  "held out for model selection; no other label was used)")
    pool = data.get("unlabelled") or ("rest" if n is not None or file is not None else "none")
    pool_text = {"rest": "the dataset's other training images, without labels", "none": "none"}.get(
        pool, f"the images in `{pool}`, without labels")
    cap = f" (at most {data['unlabelled_max_images']})" if data.get("unlabelled_max_images") else ""
    return [f"- Label budget: {labels}; unlabelled transfer pool: {pool_text}{cap}."]


def _artifacts(facts: CardFacts) -> str:
    if not facts.artifacts:
        return "## Artifacts\n\nNo artifacts index (artifacts.json) was produced by the export stage.\n"
    header = [c for c in ARTIFACT_COLUMNS if any(c in a for a in facts.artifacts)]
    rows = [[_cell(_flat_value(a.get(col))) for col in header] for a in facts.artifacts]
    return "## Artifacts\n\n" + _table(header, rows) + (
        "\nParity columns compare each artifact with the FP32 PyTorch student on the evaluation set "
        "(eval.npz), on the build machine.\n")


def _metrics(facts: CardFacts) -> str:
    parts = ["## Metrics and the conditions they were measured under\n"]
    for stage in METRIC_STAGES:
        entry = facts.stages.get(stage)
        if entry is None or not entry.metrics:
            continue
        conditions = f"device `{entry.device or 'n/a'}`, seed {entry.seed if entry.seed is not None else 'n/a'}"
        versions = ", ".join(f"{k} {v}" for k, v in sorted(entry.versions.items()))
        parts.append(f"### {stage}\n\nComputed with {conditions}; {versions or 'no package versions recorded'}.\n")
        if stage == "validate":
            parts += [_measurement_conditions(name, c) for name, c in sorted(facts.conditions.items())]
        parts += _stage_tables(entry.metrics)
    if len(parts) == 1:
        parts.append("No metrics were recorded.\n")
    return "\n".join(parts)


def _stage_tables(metrics: dict[str, Any]) -> list[str]:
    """One metric/value table for the scalars, and one table per list of records (per-artifact results,
    training history). Budget verdicts are left out: they get their own section."""
    scalars, tables = [], []
    for key in sorted(metrics):
        value = metrics[key]
        if key == "budgets":
            continue
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            header = list(dict.fromkeys(k for record in value for k in record))
            rows = [[_cell(_flat_value(record.get(col))) for col in header] for record in value]
            tables.append(f"`{key}`:\n\n" + _table(header, rows))
        else:
            scalars += [[f"`{k}`", _cell(_flat_value(v))] for k, v in _flatten(value, key)]
    return ([_table(["metric", "value"], scalars)] if scalars else []) + tables


def _measurement_conditions(name: str, conditions: dict[str, Any]) -> str:
    env, settings = conditions.get("environment", {}), conditions.get("settings", {})
    runtimes = sorted({f"{r['runtime']} {r.get('runtime_version', '')}".strip()
                       for r in conditions.get("runs", []) if r.get("runtime")})
    machine = (f"{env.get('cpu_model', 'unknown CPU')}, {env.get('cpu_count', '?')} cores, {env.get('os', '')}"
               if env else "an unrecorded machine")
    setting_text = ", ".join(f"{k} {_cell(v)}" for k, v in sorted(settings.items()))
    return (f"Device measurements in `{name}` were taken on {machine}; runtimes: {', '.join(runtimes) or 'n/a'}; "
            f"settings: {setting_text or 'n/a'}.\n")


def _budgets(facts: CardFacts) -> str:
    if not facts.budgets:
        return "## Budgets\n\nNo budgets were checked (the validate stage was disabled or set none).\n"
    header = sorted({k for b in facts.budgets for k in b})
    rows = [[_cell(_flat_value(b.get(col))) for col in header] for b in facts.budgets]
    return f"## Budgets (verdict: {facts.verdict})\n\n" + _table(header, rows)


def _limits(facts: CardFacts) -> str:
    k = len(facts.class_names)
    lines = [
        "## Known limits\n",
        _unknown_answer(facts) or
        f"- Out-of-subtask inputs: the model has exactly {k} outputs and no 'none of these' class. Any image, "
        "including one of a class outside the subtask or one that is not from the training domain at all, is "
        f"assigned to one of the {k} classes, often with high confidence. Filter inputs before the model, and "
        "do not read the softmax as a calibrated probability without checking it on your own data.",
        "- INT8: the `*.int8.*` artifacts use 8-bit weights and activations. Their accuracy differs from FP32 "
        "by the parity figures above; errors can concentrate on some classes even when the overall accuracy "
        "barely moves. INT8 is only faster where the runtime has fused INT8 kernels and there is enough "
        "compute to save; check the measured latencies rather than assuming it.",
        "- Device-specific numbers: latency, throughput and memory were measured on the machine named in the "
        "validate results and differ on any other device, runtime version or thread count. Accuracy and "
        "parity are properties of the files and carry over, up to floating-point differences between "
        "runtimes. TensorRT engines are not shipped: `tensorrt/` holds a script that builds one on the target, "
        "and its numbers must be measured there (run device_tests/ on the device).",
    ]
    if facts.missing:
        lines.append("- Not in this bundle: " + ", ".join(f"`{m}`" for m in facts.missing) + ".")
    return "\n".join(lines) + "\n"


def _unknown_answer(facts: CardFacts) -> str:
    """The `ood` rule of the export stage (pipeline/ood), if the build has one."""
    export = facts.stages.get("export")
    ood = (export.metrics or {}).get("ood") if export else None
    if not ood or "fp32" not in ood:
        return ""
    fp32 = ood["fp32"]
    return (f"- Out-of-subtask inputs: each artifact answers 'unknown' (-1) when its {ood['score']} score "
            f"(T={ood['temperature']:g}) is below the threshold in artifacts.json, calibrated to keep "
            f"{ood['tpr']:.0%} of in-subtask validation images. On the test images of the dataset's other classes "
            f"({', '.join(ood.get('outside_classes', []))}) the FP32 model still accepted "
            f"{fp32['fpr_at_threshold']:.1%} of them (AUROC {fp32['auroc']:.3f}, FPR@95 {fp32['fpr95']:.3f}). "
            "Inputs from other domains were not measured: the rule is no guarantee for them.")


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from _flatten(value[key], f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, item in enumerate(value):
            yield from _flatten(item, f"{prefix}[{i}]")
    else:
        yield prefix, value


def _flat_value(value: Any) -> Any:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in _flatten(value))
    return value


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
