"""The `validate` stage: run the on-device suite for every artifact on every target, check the budgets,
write results-<target>.json, report.html and report.md. A missed budget fails the build only after the
results are committed (after_commit), so nothing measured is lost; and it fails every build that uses the
result, cached or not. A result in which some target could not run the suite is kept for the report but never
reused: the next build tries that target again."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape

from ..errors import BudgetError
from ..report import write_report
from ..stage import Stage, StageContext, StageRecord
from ..validation.budgets import Verdict, check, table
from ..validation.crosstarget import compare
from ..validation.layers import bundle_layer_error, layer_error_section
from ..validation.matrix import short_matrix_text
from ..validation.run import run_target
from ..validation.sections import label_budget_sections, validation_sections
from ..validation.suite import TargetRun
from ..validation.targets import parse_target
from .release import LINK_NAME, withdraw_release_link


class ValidateStage(Stage):
    name = "validate"
    sections = ("validate",)

    @property
    def packages(self) -> tuple[str, ...]:
        # Every runtime the device suite can run and the explainer (zennit): a cached result must not outlive what
        # measured it. From the runner registry, so a new runtime enters the key by being registered; one that is
        # not installed reads "absent".
        from device_tests.runners import RUNNERS

        runtimes = sorted(runner.distribution or name for name, runner in RUNNERS.items())
        return ("numpy", *runtimes, "zennit", "paramiko", "matplotlib")

    def inputs(self, cfg):
        # validate.explain compares the FP32 student with the adapted teacher: it needs both.
        base = ("export", "adapt", "distill") if cfg.section("validate").explain is not None else ("export",)
        return base + (("search",) if cfg.search is not None else ())

    def run(self, ctx: StageContext) -> dict:
        cfg = ctx.config.section("validate")
        bundle = ctx.inputs["export"].dir
        runs = []
        with ctx.progress.task("validate: targets", total=len(cfg.targets)) as task:
            for spec in cfg.targets:
                runs.append(self._run_target(ctx, spec, bundle, cfg))
                task.advance(1, target=spec)
        verdicts = check(runs, cfg.budgets)
        explain, extra_sections = self._explain(ctx, cfg)
        layer_error = _layer_error(ctx, bundle)  # INT8 vs FP32 per layer (pipeline/validation/layers.py)
        extra_sections = [s for s in [layer_error_section(layer_error)] if s] + list(extra_sections)
        report_error = self._report(ctx, bundle, cfg, runs, verdicts, extra_sections)
        missed = [v for v in verdicts if not v.ok]
        ctx.log(f"validate: {len(verdicts) - len(missed)}/{len(verdicts)} checks met (report.html in the validate folder)")
        if verdicts and (matrix := short_matrix_text(verdicts)):
            ctx.log(escape(matrix))  # artifact names are data, not console markup
        # complete=False: some target could not run the suite (unreachable, runtime missing); the runner may
        # choose not to reuse such a result, so that the next build tries the target again.
        return {"passed": not missed, "complete": all(r.error is None for r in runs), "checks": len(verdicts),
                "missed": len(missed),
                "budgets": [v.to_dict() for v in verdicts], "targets": [r.summary() for r in runs],
                "artifacts": _summary(runs), "npu": _npu_summary(runs), "cross_target": [c.to_dict() for c in compare(runs)],
                "report_error": report_error, "layer_error": layer_error, **explain}

    def _explain(self, ctx: StageContext, cfg) -> tuple[dict, list]:
        """Heatmap agreement (validate.explain). Like the report, a failure here must not lose the device results:
        it is logged and recorded as explain_error."""
        if cfg.explain is None:
            return {}, []
        from ..xai.run import run_explain

        try:
            metrics, sections = run_explain(ctx, cfg.explain)
        except Exception as exc:  # noqa: BLE001 (any analysis error; the measurements matter more)
            ctx.log(f"[red]validate: explanations failed: {exc!r}[/]")
            return {"explain_error": repr(exc)}, []
        return {"explain": metrics}, sections

    def _report(self, ctx: StageContext, bundle: Path, cfg, runs, verdicts, extra_sections=()) -> str | None:
        """Write report.html / report.md. A plotting failure must not throw away the measurements: it is
        logged and recorded, and the results are committed all the same."""
        try:
            write_report(ctx.out, f"Validation of {ctx.config.build.name}",
                         label_budget_sections(ctx.config) + self._search_sections(ctx)
                         + validation_sections(runs, verdicts, _class_names(bundle))
                         + list(extra_sections),
                         subtitle=f"bundle {bundle.name}, {len(cfg.targets)} target(s), runtimes {', '.join(cfg.runtimes)}")
        except Exception as exc:  # noqa: BLE001 (any plotting error; the results matter more)
            ctx.log(f"[red]validate: the report could not be written: {exc!r}[/]")
            return repr(exc)
        return None

    def _search_sections(self, ctx: StageContext) -> list:
        if "search" not in ctx.inputs:
            return []
        from ..search.report import search_section

        return [search_section(ctx.inputs["search"].dir)]

    def _run_target(self, ctx: StageContext, spec: str, bundle: Path, cfg) -> TargetRun:
        target = parse_target(spec)
        ctx.log(f"validate: device suite on {spec} ({', '.join(cfg.runtimes)}, {cfg.threads} thread(s))")
        run = run_target(target, bundle, cfg, ctx.out / f"results-{target.slug}.json")
        (ctx.out / f"suite-{target.slug}.log").write_text(run.log)
        if run.error:
            ctx.log(f"[red]validate: {spec}: {run.error}[/]")
        return run

    def reusable(self, meta: dict) -> bool:
        return meta.get("metrics", {}).get("complete", True) is not False

    def after_commit(self, record: StageRecord, ctx) -> None:
        verdicts = [Verdict(**v) for v in record.metrics.get("budgets", [])]
        missed = [v for v in verdicts if not v.ok]
        if not missed:
            return
        release = ctx.config.section("release") if ctx is not None else None
        if release is not None and release.allow_failed_validation:
            ctx.log(f"[bold yellow]warning:[/] validation missed {len(missed)} of {len(verdicts)} checks; the release "
                    "is cut anyway because release.allow_failed_validation is true (its model card says so).\n"
                    + table(missed))
            return
        withdrawn = withdraw_release_link(record.dir.parent)
        if withdrawn is not None and ctx is not None:
            ctx.log(f"  release: removed the `{LINK_NAME}` link to {withdrawn}: this build's validation failed, so "
                    "the latest release is not a validated one (the older release folder is kept)")
        raise BudgetError(
            f"Validation missed {len(missed)} of {len(verdicts)} checks; all results are kept in {record.dir} "
            "(results-*.json, report.html), and no release is cut from them.",
            "Improve the model, fix the target, or relax validate.budgets, then rebuild (a target that could not "
            "be reached is tried again; set release.allow_failed_validation: true only to ship a failed build "
            f"on purpose).\n\n{table(missed)}")


def _layer_error(ctx: StageContext, bundle: Path) -> dict | None:
    """Like the report, an analysis failure must not lose the device results: logged, recorded as the error."""
    try:
        return bundle_layer_error(bundle)
    except Exception as exc:  # noqa: BLE001
        ctx.log(f"[red]validate: per-layer INT8 error failed: {exc!r}[/]")
        return {"error": repr(exc)}


def _class_names(bundle: Path) -> list[str]:
    from exporters.artifacts import ArtifactListing

    try:
        return list(ArtifactListing.read(bundle).class_names)
    except (OSError, ValueError):
        return []


def _npu_summary(runs: list[TargetRun]) -> list[dict]:
    """Vela's estimates per ethos_u artifact and target (the per-layer table stays in results-<target>.json)."""
    keys = ("artifact", "accelerator", "system_config", "memory_mode", "clock_mhz", "npu_ops", "cpu_ops", "sram_kib",
            "flash_kib", "cycles", "inference_ms")
    return [{"target": r.target, **{k: npu.get(k) for k in keys},
             "cpu_fallback": [c["operator"] for c in npu.get("cpu_fallback", [])]}
            for r in runs for npu in (r.results or {}).get("npu", [])]


def _summary(runs: list[TargetRun]) -> list[dict]:
    """One compact row per measured artifact, for stage.json and `edgesmith status`."""
    rows = []
    for r in runs:
        for run in (r.results or {}).get("runs", []):
            if run.get("status") != "passed":
                continue
            m = run["latency"]["model"]
            rows.append({"target": r.target, "artifact": run["artifact"], "runtime": run["runtime"],
                         "precision": run["precision"], "top1": run.get("accuracy", {}).get("top1"),
                         "p50_ms": m["p50_ms"], "p90_ms": m["p90_ms"], "p99_ms": m["p99_ms"],
                         "images_per_s": run["throughput"]["images_per_s"], "peak_rss_mb": run["peak_rss_mb"],
                         "size_bytes": run["size_bytes"],
                         **({"auroc": run["ood"]["auroc"], "fpr95": run["ood"]["fpr95"]} if run.get("ood") else {})})
    return rows
