"""Budgets: every artifact on every target against validate.budgets. A verdict row says what was measured,
what is allowed, and whether it passed; a target that could not run, a runtime that was absent, a failed
device test, each is a failed row too, so nothing disappears silently."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

from .config import Budgets
from .suite import TargetRun
from .targets import is_emulated

EMULATED = "not applied: emulated target"

MIB = 1 << 20
EPS = 1e-9  # accuracies are ratios of counts; a drop of 0.0 must not fail on rounding


@dataclass(frozen=True)
class Verdict:
    target: str
    artifact: str
    runtime: str
    budget: str
    measured: Any
    allowed: Any
    ok: bool

    def to_dict(self) -> dict:
        return asdict(self)


def _per_target(value, target: str) -> Optional[float]:
    return value.get(target) if isinstance(value, dict) else value


def _rows(run: dict, budgets: Budgets, target: str) -> list[tuple[str, float, float, bool]]:
    """(budget, measured, allowed, ok) for one measured artifact."""
    acc, lat = run.get("accuracy", {}), run["latency"]["model"]
    checks = []
    if budgets.min_accuracy is not None and "top1" in acc:
        checks.append(("min_accuracy", acc["top1"], budgets.min_accuracy, acc["top1"] >= budgets.min_accuracy - EPS))
    if budgets.max_drop_vs_fp32 is not None and "fp32_top1" in acc:
        drop = acc["fp32_top1"] - acc["top1"]
        checks.append(("max_drop_vs_fp32", drop, budgets.max_drop_vs_fp32, drop <= budgets.max_drop_vs_fp32 + EPS))
    if budgets.max_drop_vs_teacher is not None and "teacher_top1" in acc:
        drop = acc["teacher_top1"] - acc["top1"]
        checks.append(("max_drop_vs_teacher", drop, budgets.max_drop_vs_teacher, drop <= budgets.max_drop_vs_teacher + EPS))
    for key, stat in (("max_p90_ms", "p90_ms"), ("max_p99_ms", "p99_ms")):
        allowed = _per_target(getattr(budgets, key), target)
        if allowed is not None and is_emulated(target):  # an emulated CPU's time says nothing of the device's
            checks.append((key, f"{lat[stat]:.4g} (emulated)", EMULATED, True))
        elif allowed is not None:
            checks.append((key, lat[stat], allowed, lat[stat] <= allowed))
    if budgets.max_size_mb is not None:
        size = run["size_bytes"] / MIB
        checks.append(("max_size_mb", size, budgets.max_size_mb, size <= budgets.max_size_mb))
    if budgets.max_peak_rss_mb is not None:
        checks.append(("max_peak_rss_mb", run["peak_rss_mb"], budgets.max_peak_rss_mb,
                       run["peak_rss_mb"] <= budgets.max_peak_rss_mb))
    return checks + _ood_rows(run.get("ood"), budgets) + mcu_rows(run, budgets, target)


KIB = 1024


def mcu_rows(run: dict, budgets: Budgets, target: str) -> list[tuple[str, float, float, bool]]:
    """max_arena_kb / max_flash_kb: checked for artifacts measured under TFLite Micro (they report an arena)."""
    if "arena_used_bytes" not in run:
        return []
    checks = []
    for key, measured in (("max_arena_kb", run["arena_used_bytes"] / KIB), ("max_flash_kb", run["flash_bytes"] / KIB)):
        allowed = _per_target(getattr(budgets, key), target)
        if allowed is not None:
            checks.append((key, measured, allowed, measured <= allowed))
    return checks


NPU_BUDGETS = (("max_npu_ms", "inference_ms"), ("max_npu_sram_kb", "sram_kib"), ("max_npu_flash_kb", "flash_kib"),
               ("max_cpu_fallback_ops", "cpu_ops"))
NPU_RUNTIME = "vela estimate"


def npu_rows(npu: dict, budgets: Budgets, target: str) -> list[tuple[str, float, float, bool]]:
    """max_npu_ms / max_npu_sram_kb / max_npu_flash_kb / max_cpu_fallback_ops for one ethos_u artifact (Vela's
    estimates, recorded by the device suite)."""
    checks = []
    for key, measured in NPU_BUDGETS:
        allowed = _per_target(getattr(budgets, key), target)
        if allowed is not None:
            checks.append((key, npu[measured], allowed, npu[measured] <= allowed))
    return checks


def _ood_rows(ood: Optional[dict], budgets: Budgets) -> list[tuple[str, Any, float, bool]]:
    """max_fpr95 / min_auroc; an artifact measured without the unknown answer misses them (nothing silent)."""
    checks = []
    for key, metric, upper in (("max_fpr95", "fpr95", True), ("min_auroc", "auroc", False)):
        allowed = getattr(budgets, key)
        if allowed is None:
            continue
        if not ood:
            checks.append((key, "not measured (no ood rule, or eval.npz without ood_images_u8)", allowed, False))
            continue
        value = ood[metric]
        checks.append((key, value, allowed, value <= allowed + EPS if upper else value >= allowed - EPS))
    return checks


def check(runs: list[TargetRun], budgets: Budgets) -> list[Verdict]:
    verdicts: list[Verdict] = []
    for target_run in runs:
        t = target_run.target
        if target_run.error:
            verdicts.append(Verdict(t, "-", "-", "target ran the suite", target_run.error, "no error", False))
        results = target_run.results or {}
        for run in results.get("runs", []):
            name, runtime = run.get("artifact", "?"), run.get("runtime", "?")
            if run.get("status") != "passed":
                what = "runtime available" if run.get("skipped") else "measured"
                verdicts.append(Verdict(t, name, runtime, what, run.get("message", run.get("status")), "yes", False))
                continue
            verdicts += [Verdict(t, name, runtime, b, m, a, ok) for b, m, a, ok in _rows(run, budgets, t)]
        for npu in results.get("npu", []):
            verdicts += [Verdict(t, npu["artifact"], NPU_RUNTIME, b, m, a, ok) for b, m, a, ok in npu_rows(npu, budgets, t)]
        tests = results.get("tests")
        if tests is not None:
            failed = [o for o in tests["outcomes"] if o["outcome"] == "failed"]
            measured = f"{len(failed)} failed" + (": " + "; ".join(_short(o) for o in failed[:3]) if failed else "")
            verdicts.append(Verdict(t, "-", "-", "device tests", measured, "0 failed", not failed))
    return verdicts


def _short(outcome: dict) -> str:
    return f"{outcome['nodeid'].split('::')[-1]}: {outcome['message'][:160]}"


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(verdicts: list[Verdict], only_failed: bool = False) -> str:
    """A plain-text table: target, artifact, runtime, budget, measured, allowed, verdict."""
    rows = [v for v in verdicts if not (only_failed and v.ok)]
    header = ("target", "artifact", "runtime", "budget", "measured", "allowed", "verdict")
    cells = [header] + [(v.target, v.artifact, v.runtime, v.budget, _clip(fmt(v.measured)), fmt(v.allowed),
                         "ok" if v.ok else "MISSED") for v in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _clip(text: str, n: int = 90) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."
