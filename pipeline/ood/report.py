"""The report's section on inputs outside the subtask: per artifact and runtime the shipped rule, AUROC,
FPR@95, the operating point on the device, and the score distributions of in- and out-of-subtask images."""

from __future__ import annotations

from html import escape
from typing import Optional

from ..report import Section, figure_html, html_table, md_table, once_per_artifact, passed_runs, pyplot, subplot_grid

HEADERS = ["target", "artifact", "runtime", "score", "T", "threshold", "AUROC", "FPR@95", "in kept", "outside accepted",
           "top-1 accepted", "top-1 all", "open-set acc"]


def ood_rows(runs) -> list[tuple[str, dict]]:
    return [(t, run) for t, run in passed_runs(runs) if run.get("ood")]


def ood_section(runs) -> Optional[Section]:
    points = ood_rows(runs)
    if not points:
        return None
    rows = [[t, run["artifact"], run["runtime"], o["score"], o["temperature"], o["threshold"], o["auroc"], o["fpr95"],
             o["tpr_at_threshold"], o["fpr_at_threshold"], o["accuracy_accepted"], o["accuracy_all"],
             o["open_set_accuracy"]] for t, run in points for o in [run["ood"]]]
    first = points[0][1]["ood"]
    note = (f'<p class="note">In-subtask: {escape(str(first["n_in"]))} evaluation images; '
            f'outside: {escape(str(first["n_out"]))} test images of '
            "the dataset's other classes (never used to train or calibrate). The threshold was calibrated on in-subtask "
            "validation images to keep a fixed fraction of them; below it the answer is unknown. FPR@95 puts its own "
            "threshold at 95 % of these in-subtask images; 'in kept' / 'outside accepted' are at the shipped threshold.</p>")
    body = html_table(HEADERS, rows, left=4) + note + _histograms(points)
    return Section("Inputs outside the subtask", body, md_table(HEADERS, rows))


def _histograms(points) -> str:
    unique = once_per_artifact(points)  # the distributions do not depend on the target
    fig, axes = subplot_grid(pyplot(), len(unique), (5.4, 3.4))
    for ax, run in zip(axes, unique):
        o = run["ood"]
        h = o["histogram"]
        edges = h["edges"]
        width = [b - a for a, b in zip(edges[:-1], edges[1:])]
        for key, label, color in (("in", "in subtask", "tab:blue"), ("out", "outside", "tab:red")):
            total = max(sum(h[key]), 1)
            ax.bar(edges[:-1], [c / total for c in h[key]], width=width, align="edge", alpha=0.5, color=color,
                   label=f"{label} (n={sum(h[key])})")
        ax.axvline(o["threshold"], color="black", linestyle="--", linewidth=1, label="threshold")
        ax.set_title(f"{run['artifact']} ({run['runtime']}): AUROC {o['auroc']:.3f}", fontsize=9)
        ax.set_xlabel(f"{o['score']} score (higher = in subtask)", fontsize=8)
        ax.set_ylabel("fraction", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_html(fig, "OOD score distributions")
