"""The report section of `validate.explain`: agreement scores, the grid (image | teacher heatmap | student
heatmap) and the student's pixel-flipping curve, as a Section of pipeline/report.py."""

from __future__ import annotations

import numpy as np

from ..report import Section, esc, figure_html, html_table, md_table, pyplot


def explain_section(metrics: dict, arrays: dict, class_names: list[str], rows: int) -> Section:
    headers, table = _table(metrics)
    notes = _notes(metrics)
    html = (html_table(headers, table) + "".join(f'<p class="note">{esc(n)}</p>' for n in notes)
            + grid_figure(arrays, class_names, rows) + flipping_figure(metrics["student_pixel_flipping"]))
    markdown = md_table(headers, table) + "\n\n" + "\n".join(f"- {n}" for n in notes) \
        + "\n\n(The heatmap grid and the pixel-flipping curve are in report.html.)"
    return Section("Explanations: does the student decide like the teacher?", html, markdown)


def _table(metrics: dict) -> tuple[list[str], list[list]]:
    flip = metrics["student_pixel_flipping"]
    headers = ["measure", "value"]
    rows = [
        ["images (test split, seeded sample)", metrics["images"]],
        ["common resolution", f"{metrics['common_size']}x{metrics['common_size']}"],
        ["cosine similarity, mean +- std", f"{metrics['cosine_mean']:.3f} +- {metrics['cosine_std']:.3f}"],
        ["Spearman rank correlation, mean +- std", f"{metrics['spearman_mean']:.3f} +- {metrics['spearman_std']:.3f}"],
        ["student pixel flipping AUC: relevance order / random order",
         f"{flip['auc']['relevance']:.3f} / {flip['auc']['random']:.3f}"],
        ["teacher: relevance sum / logit gap", f"{metrics['teacher']['conservation']:.3f}"],
        ["student: relevance sum / logit gap", f"{metrics['student']['conservation']:.3f}"],
    ]
    return headers, rows


def _notes(metrics: dict) -> list[str]:
    return [
        "Heatmaps explain the logit gap (target logit minus the largest other subtask logit), summed over channels "
        "and area-resized to the common resolution before comparing; 1 = the same pattern.",
        f"Teacher ({'x'.join(map(str, metrics['teacher']['input']))}): {metrics['teacher']['rules']}.",
        f"Student ({'x'.join(map(str, metrics['student']['input']))}): {metrics['student']['rules']}.",
        "Pixel flipping: the most relevant pixels first are set to the normalisation mean; a faithful heatmap makes "
        "the gap fall faster than a random order (smaller area under the curve). zennit " + metrics["zennit"] + ".",
    ]


def _signed(ax, heat: np.ndarray, title: str) -> None:
    limit = float(np.abs(heat).max()) or 1.0
    ax.imshow(heat, cmap="bwr", vmin=-limit, vmax=limit, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def grid_figure(arrays: dict, class_names: list[str], rows: int) -> str:
    plt = pyplot()
    n = min(rows, len(arrays["labels"]))
    fig, axes = plt.subplots(n, 3, figsize=(5.4, 1.8 * n), squeeze=False)
    for i in range(n):
        image = arrays["images_u8"][i].astype(np.float32).mean(0)
        label = int(arrays["labels"][i])
        name = class_names[label] if label < len(class_names) else str(label)
        axes[i, 0].imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        axes[i, 0].set_title(f"{name}", fontsize=8)
        axes[i, 0].axis("off")
        _signed(axes[i, 1], arrays["teacher_maps"][i], "teacher")
        _signed(axes[i, 2], arrays["student_maps"][i],
                f"student (cos {arrays['cosine'][i]:.2f}, rho {arrays['spearman'][i]:.2f})")
    fig.suptitle("red: for the target class, blue: for the strongest other class", fontsize=8)
    fig.tight_layout()
    return figure_html(fig, "grid of test images with teacher and student heatmaps")


def flipping_figure(flip: dict) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 2.8))
    for name, curve in flip["mean_gap"].items():
        ax.plot(np.asarray(flip["fractions"]) * 100, curve, marker="o", markersize=3,
                label=f"{name} order (AUC {flip['auc'][name]:.2f})")
    ax.axhline(0, color="#999", linewidth=0.8)
    ax.set_xlabel("pixels flipped (%)")
    ax.set_ylabel("mean logit gap (student)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_html(fig, "student pixel-flipping curve")
