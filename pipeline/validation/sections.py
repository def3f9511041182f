"""The validation report's sections: verdict and budgets, results per artifact and target, accuracy versus
latency, latency distributions, confusion matrices, per-class accuracy, environments."""

from __future__ import annotations

from typing import Optional

from ..ood.report import ood_section
from ..report import Section, esc, figure_html, html_table, md_table, once_per_artifact, passed_runs, pyplot, subplot_grid
from .budgets import MIB, Verdict, fmt
from .crosstarget import cross_target_section
from .layers import layer_latency_section, tool_section
from .matrix import NOT_APPLICABLE, matrix_html, matrix_rows, verdict_matrix
from .mcu import mcu_section
from .npu import npu_section
from .suite import TargetRun
from .targets import is_emulated, timed_label

EMULATED_NOTE = ("Targets marked (emulated) run on an emulated CPU (validate.targets with ?emulated=true): their "
                 "accuracies are real, their times are not a measure of any device, and latency budgets are not "
                 "applied to them.")


def _label(run: dict) -> str:
    return f"{run['artifact']} ({run['runtime']})"


def verdict_section(verdicts: list[Verdict]) -> Section:
    missed = [v for v in verdicts if not v.ok]
    headline = (f'<p><span class="verdict failv">FAILED: {len(missed)} of {len(verdicts)} checks missed</span></p>'
                if missed else f'<p><span class="verdict pass">PASSED: all {len(verdicts)} checks met</span></p>')
    headers = ["target", "artifact", "runtime", "budget", "measured", "allowed", "verdict"]
    rows = [[v.target, v.artifact, v.runtime, v.budget, fmt(v.measured), fmt(v.allowed), "ok" if v.ok else "MISSED"]
            for v in verdicts]
    note = ('<p class="note">Accuracies are fractions of the evaluation set; drops are in the same unit. '
            "Latency budgets apply to the model call at batch 1; memory is the peak RSS of the measuring process.</p>")
    md = ("**FAILED**" if missed else "**PASSED**") + f": {len(verdicts) - len(missed)}/{len(verdicts)} checks met.\n\n"
    table = html_table(headers, rows, ["ok" if v.ok else "fail" for v in verdicts], left=4)
    matrix = verdict_matrix(verdicts)
    matrix_note = ('<p class="note">One row per artifact and runtime, rows that miss a budget first; '
                   f"{NOT_APPLICABLE}: the budget does not apply (or is not set). Hover a cell for its limit.</p>")
    if not matrix.rows:  # no check at all: nothing to tabulate twice
        return Section("Verdict and budgets", headline + table + note, md + md_table(headers, rows))
    body = headline + matrix_html(matrix) + matrix_note + "<h3>Every check</h3>" + table + note
    return Section("Verdict and budgets", body,
                   md + md_table(*matrix_rows(matrix)) + "\n\nEvery check:\n\n" + md_table(headers, rows))


def results_section(runs: list[TargetRun]) -> Section:
    acc_headers = ["target", "artifact", "runtime", "precision", "size MiB", "top-1", "agree FP32", "agree INT8",
                   "agree teacher", "FP32 top-1", "teacher top-1"]
    lat_headers = ["target", "artifact", "runtime", "p50 ms", "p90 ms", "p99 ms", "mean ms", "std ms", "queries",
                   "pre p50 ms", "post p50 ms", "img/s", "batch", "peak RSS MiB"]
    acc_rows, lat_rows = [], []
    for target, run in passed_runs(runs):
        acc, lat, tp = run.get("accuracy", {}), run["latency"], run["throughput"]
        m = lat["model"]
        acc_rows.append([target, run["artifact"], run["runtime"], run["precision"], run["size_bytes"] / MIB,
                         acc.get("top1"), acc.get("agreement_fp32"), acc.get("agreement_int8"), acc.get("agreement_teacher"),
                         acc.get("fp32_top1"), acc.get("teacher_top1")])
        lat_rows.append([timed_label(target), run["artifact"], run["runtime"], m["p50_ms"], m["p90_ms"], m["p99_ms"],
                         m["mean_ms"], m["std_ms"], lat["queries"], lat["preprocess"]["p50_ms"], lat["postprocess"]["p50_ms"],
                         tp["images_per_s"], tp["batch"], run["peak_rss_mb"]])
    failed = [(r.target, run) for r in runs for run in (r.results or {}).get("runs", []) if run.get("status") != "passed"]
    problems = [f"{t} · {_label(run)}: {run.get('status')}: {run.get('message', '')}" for t, run in failed]
    problems += [f"{r.target}: {r.error}" for r in runs if r.error]
    note = ('<p class="note">Model time is the runtime call alone at batch 1 (warm-up discarded, at least the '
            "configured queries and duration); pre = numpy normalisation of one raw image, post = softmax + top-1; "
            "img/s is the model call at the stated batch."
            + (f" {EMULATED_NOTE}" if any(is_emulated(r.target) for r in runs) else "") + "</p>")
    body = ("<h3>Accuracy</h3>" + html_table(acc_headers, acc_rows, left=4) + "<h3>Latency and memory</h3>"
            + html_table(lat_headers, lat_rows, left=3) + note
            + "".join(f'<p class="note fail">{esc(p)}</p>' for p in problems))
    md = (md_table(acc_headers, acc_rows) + "\n\n" + md_table(lat_headers, lat_rows)
          + (f"\n\n{EMULATED_NOTE}" if any(is_emulated(r.target) for r in runs) else "")
          + "".join(f"\n\n- {p}" for p in problems))
    return Section("Results per artifact and target", body, md)


def accuracy_latency_section(runs: list[TargetRun]) -> Optional[Section]:
    points = [(t, run) for t, run in passed_runs(runs) if "accuracy" in run]
    if not points:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    markers = "osD^v<>p*h"
    targets = sorted({t for t, _ in points})
    for t, run in points:
        m = run["latency"]["model"]
        ax.errorbar(m["p50_ms"], run["accuracy"]["top1"], xerr=[[0], [max(m["p90_ms"] - m["p50_ms"], 0)]],
                    fmt=markers[targets.index(t) % len(markers)], capsize=3, label=f"{_label(run)} @ {timed_label(t)}")
    ax.set_xlabel("model latency, batch 1: p50 (bar to p90) [ms]")
    ax.set_ylabel("top-1 on the evaluation set")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return Section("Accuracy versus latency", figure_html(fig, "accuracy versus latency"),
                   "See report.html for the figure (top-1 against p50 model latency per artifact and target).")


def latency_distribution_section(runs: list[TargetRun]) -> Optional[Section]:
    points = passed_runs(runs)
    if not points:
        return None
    plt = pyplot()
    targets = sorted({t for t, _ in points})
    fig, axes = plt.subplots(1, len(targets), figsize=(7.5 * min(len(targets), 2), 4.2), squeeze=False)
    for ax, target in zip(axes[0], targets):
        for t, run in points:
            if t == target:
                cdf = run["latency"]["model"]["cdf_ms"]
                ax.plot(cdf, range(len(cdf)), label=_label(run))
        ax.set_xscale("log")
        ax.set_xlabel("model latency, batch 1 [ms] (log)")
        ax.set_ylabel("percentile")
        ax.set_title(timed_label(target), fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return Section("Latency distribution", figure_html(fig, "latency CDF"),
                   "See report.html for the latency CDF per target.")


def confusion_section(runs: list[TargetRun], class_names: list[str]) -> Optional[Section]:
    points = once_per_artifact([(t, run) for t, run in passed_runs(runs) if "accuracy" in run])
    if not points:
        return None
    fig, axes = subplot_grid(pyplot(), len(points), (5.2, 4.6))
    per_class_rows = []
    for ax, run in zip(axes, points):
        cm = run["accuracy"]["confusion"]
        names = class_names if len(class_names) == len(cm) else [str(i) for i in range(len(cm))]
        ax.imshow(cm, cmap="Blues")
        ax.set_xticks(range(len(cm)), names, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(cm)), names, fontsize=7)
        high = max(max(r) for r in cm) or 1
        for i, row in enumerate(cm):
            for j, v in enumerate(row):
                ax.text(j, i, v, ha="center", va="center", fontsize=7, color="white" if v > high / 2 else "black")
        ax.set_title(_label(run), fontsize=9)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        per_class_rows.append([_label(run)] + run["accuracy"]["per_class"])
    fig.tight_layout()
    names = class_names if class_names and len(class_names) == len(points[0]["accuracy"]["per_class"]) else \
        [str(i) for i in range(len(points[0]["accuracy"]["per_class"]))]
    headers = ["artifact (runtime)"] + names
    return Section("Confusion matrices and per-class accuracy",
                   figure_html(fig, "confusion matrices") + html_table(headers, per_class_rows),
                   md_table(headers, per_class_rows))


def environment_section(runs: list[TargetRun]) -> Section:
    headers = ["target", "host", "CPU", "usable cores", "OS", "python", "threads", "runtimes"]
    rows = []
    for r in runs:
        res = r.results or {}
        env, settings = res.get("environment", {}), res.get("settings", {})
        versions = sorted({f"{run['runtime']} {run.get('runtime_version', '')}".strip()
                           for run in res.get("runs", []) if run.get("status") == "passed"})
        rows.append([timed_label(r.target), env.get("hostname"), env.get("cpu_model"), env.get("usable_cores"), env.get("os"),
                     env.get("python"), settings.get("threads"), ", ".join(versions)])
    settings = next(((r.results or {}).get("settings") for r in runs if r.results), {}) or {}
    note = (f'<p class="note">Protocol: warm-up {esc(settings.get("warmup"))} queries discarded, at least '
            f'{esc(settings.get("min_queries"))} timed queries and {esc(settings.get("min_duration_s"))} s per artifact; '
            f'throughput at batch {esc(settings.get("throughput_batch"))}; OpenVINO precision hint '
            f'{esc(settings.get("precision_hint"))}. Absolute times depend on the machine and its load; ratios measured '
            "in one run are the stable part.</p>")
    return Section("Environment", html_table(headers, rows, left=3) + note, md_table(headers, rows))


def validation_sections(runs: list[TargetRun], verdicts: list[Verdict], class_names: list[str]) -> list[Section]:
    sections = [verdict_section(verdicts), results_section(runs), cross_target_section(runs),
                accuracy_latency_section(runs),
                latency_distribution_section(runs), confusion_section(runs, class_names), environment_section(runs)]
    sections.insert(-1, ood_section(runs))  # pipeline/ood/report.py; None without the unknown answer
    sections.insert(2, mcu_section(runs, verdicts))  # None without a TFLite Micro artifact
    sections.insert(3, npu_section(runs, verdicts))  # beside it; None without an Ethos-U (Vela) artifact
    sections[2:2] = [tool_section(runs), layer_latency_section(runs)]  # pipeline/validation/layers.py
    return [s for s in sections if s is not None]


def label_budget_sections(config) -> list[Section]:
    """'Label budget' for a build made from few labels (data.labels_per_class) or with an unlabelled pool; none
    otherwise, so other reports are unchanged."""
    data = config.data
    if data.labels_per_class is None and data.unlabelled is None and data.labels_file is None:
        return []
    from ..data.budget import val_per_class

    n, file = data.labels_per_class, data.labels_file
    pool = data.unlabelled or ("rest" if n is not None or file is not None else "none")
    if file is not None:
        labelled = [["labelled images", f"those listed in {file}"],
                    ["of which held out for model selection", "round(val_fraction x n) of a class's n, at most n/4"]]
    else:
        labelled = [["labelled images per subtask class", n if n is not None else "all"],
                    ["of which held out for model selection",
                     val_per_class(n, data.val_fraction) if n is not None else "-"]]
    rows = [*labelled,
            ["unlabelled transfer pool", pool],
            ["pool cap", data.unlabelled_max_images or "none"]]
    note = ("<p class=\"note\">The teacher was adapted on the labelled images only, distillation trained on the "
            "labelled images and the pool (labels only where they exist), and every model was selected on the "
            "held-out labelled images: no other label was used.</p>")
    return [Section("Label budget", html_table(["", "value"], rows) + note, md_table(["", "value"], rows))]
