"""A self-contained report: report.html (inline CSS, figures as base64 PNG, no external resource) and a
report.md summary, both built from a list of sections. Any stage can contribute sections (validation,
distillation metrics, OOD, heatmaps): a Section is a title, an HTML body and a Markdown body."""

from __future__ import annotations

import base64
import html
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.meta{color:#666;font-size:.9em} table{border-collapse:collapse;margin:.6em 0;font-size:.85em}
th,td{border:1px solid #ddd;padding:.25em .55em;text-align:right} th{background:#f4f4f4}
td.l,th.l{text-align:left} tr.fail td{background:#fde8e8} tr.ok td.v{color:#1a7f37} tr.fail td.v{color:#c62828;font-weight:bold}
img{max-width:100%;height:auto;border:1px solid #eee} .note{color:#555;font-size:.9em}
.verdict{display:inline-block;padding:.3em .8em;border-radius:4px;font-weight:bold}
.pass{background:#e6f4ea;color:#1a7f37} .failv{background:#fde8e8;color:#c62828}
td.miss{background:#f6c6c6;color:#b71c1c;font-weight:bold}
td.na{color:#999;text-align:center} td.l.fail{color:#c62828;font-weight:bold}
"""


@dataclass(frozen=True)
class Section:
    title: str
    html: str       # body, already escaped where it holds data
    markdown: str


def esc(value: Any) -> str:
    return html.escape(str(value))


def cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return "" if value is None else str(value)


def html_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], row_classes: Sequence[str] | None = None,
               left: int = 1) -> str:
    """Columns before `left` are left-aligned (names); the rest are numbers."""
    rows = list(rows)
    classes = list(row_classes) if row_classes else [""] * len(rows)
    head = "".join(f'<th class="{"l" if i < left else ""}">{esc(h)}</th>' for i, h in enumerate(headers))
    body = "".join(
        f'<tr class="{c}">' + "".join(f'<td class="{"l" if i < left else ""}{" v" if h == "verdict" else ""}">'
                                      f"{esc(cell(v))}</td>" for i, (h, v) in enumerate(zip(headers, r))) + "</tr>"
        for r, c in zip(rows, classes))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def clean(v: Any) -> str:
        return cell(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(clean(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def figure_html(fig, alt: str) -> str:
    """Render a matplotlib figure into an <img> with the PNG inline, and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def render_html(title: str, sections: Sequence[Section], subtitle: str = "") -> str:
    toc = "".join(f'<li><a href="#s{i}">{esc(s.title)}</a></li>' for i, s in enumerate(sections))
    body = "".join(f'<section id="s{i}"><h2>{esc(s.title)}</h2>{s.html}</section>' for i, s in enumerate(sections))
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>"
            f'<p class="meta">{esc(subtitle)} &middot; generated {stamp} by edgesmith</p>'
            f"<ul>{toc}</ul>{body}</body></html>\n")


def render_markdown(title: str, sections: Sequence[Section], subtitle: str = "") -> str:
    parts = [f"# {title}", subtitle] + [f"## {s.title}\n\n{s.markdown}" for s in sections]
    return "\n\n".join(p for p in parts if p) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(out_dir: Path, title: str, sections: Sequence[Section], subtitle: str = "") -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    _write(html_path, render_html(title, sections, subtitle))
    _write(md_path, render_markdown(title, sections, subtitle))
    return html_path, md_path


# Shared by the sections (validation, ood, xai): runs that passed, each model once, a grid of panels.
def passed_runs(runs: Sequence) -> list[tuple[str, dict]]:
    return [(r.target, run) for r in runs for run in (r.results or {}).get("runs", []) if run.get("status") == "passed"]


def once_per_artifact(points: list[tuple[str, dict]]) -> list[dict]:
    """Each artifact x runtime once (first target): what depends only on the model file plots alike everywhere."""
    seen, unique = set(), []
    for _target, run in points:
        if (run["artifact"], run["runtime"]) not in seen:
            seen.add((run["artifact"], run["runtime"]))
            unique.append(run)
    return unique


def subplot_grid(plt, n: int, cell: tuple[float, float]):
    """A figure with n panels, two per row; the unused panel of an odd count is switched off."""
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cell[0] * cols, cell[1] * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
