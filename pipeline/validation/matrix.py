"""The verdict as a matrix: one row per artifact and runtime (and target, where there are several), one column
per budget, each cell the measured value, passed or missed. Rows that miss anything come first, so a failed
build shows why in its first lines; the full verdict list stays below it in the report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..report import esc
from .budgets import Verdict, fmt
from .config import Budgets

NOT_APPLICABLE = "—"
MISSED_MARK = "✗"
# Short column titles; the config key is the cell's tooltip. A check that is not a budget ("measured", "device
# tests", ...) keeps its own name.
TITLES = {"min_accuracy": "top-1", "max_drop_vs_fp32": "drop vs FP32", "max_drop_vs_teacher": "drop vs teacher",
          "max_p90_ms": "p90 ms", "max_p99_ms": "p99 ms", "max_size_mb": "size MiB", "max_peak_rss_mb": "peak RSS MiB",
          "max_fpr95": "FPR at 95 % TPR", "min_auroc": "AUROC", "max_arena_kb": "arena KiB", "max_flash_kb": "flash KiB",
          "max_npu_ms": "NPU ms (est.)", "max_npu_sram_kb": "NPU SRAM KiB", "max_npu_flash_kb": "NPU flash KiB",
          "max_cpu_fallback_ops": "CPU-fallback ops"}
BUDGET_ORDER = tuple(Budgets.model_fields)
MESSAGE_CHARS = 40  # a "not measured" message is shown clipped; the whole text is in the tooltip


@dataclass(frozen=True)
class MatrixRow:
    target: str
    artifact: str
    runtime: str
    cells: dict[str, Verdict]  # budget -> its verdict; a budget that does not apply to this row is absent

    @property
    def failed(self) -> bool:
        return any(not v.ok for v in self.cells.values())

    @property
    def label(self) -> str:
        # Checks of the whole target (it could not run the suite, its device tests) carry no artifact.
        return "whole target" if self.artifact == "-" else f"{self.artifact} ({self.runtime})"


@dataclass(frozen=True)
class VerdictMatrix:
    columns: tuple[str, ...]
    rows: tuple[MatrixRow, ...]
    targets: tuple[str, ...]

    @property
    def per_target(self) -> bool:
        return len(self.targets) > 1


def verdict_matrix(verdicts: list[Verdict]) -> VerdictMatrix:
    """Group the verdicts by (target, artifact, runtime); rows with a missed check first, each group in the
    order the checks were made."""
    groups: dict[tuple[str, str, str], dict[str, Verdict]] = {}
    for v in verdicts:
        groups.setdefault((v.target, v.artifact, v.runtime), {})[v.budget] = v
    rows = [MatrixRow(t, a, r, cells) for (t, a, r), cells in groups.items()]
    rows.sort(key=lambda row: not row.failed)  # stable: the order within each half is kept
    seen = list(dict.fromkeys(v.budget for v in verdicts))
    columns = [b for b in BUDGET_ORDER if b in seen] + [b for b in seen if b not in BUDGET_ORDER]
    return VerdictMatrix(tuple(columns), tuple(rows), tuple(dict.fromkeys(v.target for v in verdicts)))


def cell_text(verdict: Optional[Verdict]) -> str:
    if verdict is None:
        return NOT_APPLICABLE
    text = fmt(verdict.measured)
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 3] + "..."


def column_title(budget: str) -> str:
    return TITLES.get(budget, budget)


def column_limit(matrix: VerdictMatrix, budget: str) -> str:
    """'<= 10' under a budget's title when every row has the same limit (a per-target budget may not)."""
    allowed = {fmt(row.cells[budget].allowed) for row in matrix.rows if budget in row.cells}
    if len(allowed) != 1 or budget not in BUDGET_ORDER:
        return ""
    return ("≥ " if budget.startswith("min_") else "≤ ") + allowed.pop()


def _limit_tooltip(budget: str, verdict: Verdict) -> str:
    return f"{budget}: measured {fmt(verdict.measured)}, allowed {fmt(verdict.allowed)}"


def matrix_html(matrix: VerdictMatrix) -> str:
    lead = ['<th class="l">target</th>'] if matrix.per_target else []
    head = lead + ['<th class="l">artifact (runtime)</th>'] + [
        f'<th title="{esc(b)}">' + "<br>".join(esc(t) for t in (column_title(b), column_limit(matrix, b)) if t) + "</th>"
        for b in matrix.columns]
    body = "".join(_row_html(matrix, row) for row in matrix.rows)
    return f'<table class="matrix"><thead><tr>{"".join(head)}</tr></thead><tbody>{body}</tbody></table>'


def _row_html(matrix: VerdictMatrix, row: MatrixRow) -> str:
    state = "fail" if row.failed else "ok"
    lead = [f'<td class="l">{esc(row.target)}</td>'] if matrix.per_target else []
    cells = lead + [f'<td class="l {state}">{esc(row.label)}</td>']
    for budget in matrix.columns:
        verdict = row.cells.get(budget)
        if verdict is None:
            cells.append(f'<td class="na">{NOT_APPLICABLE}</td>')
        else:
            cells.append(f'<td class="{"pass" if verdict.ok else "miss"}" title="{esc(_limit_tooltip(budget, verdict))}">'
                         f"{esc(cell_text(verdict))}</td>")
    return "<tr>" + "".join(cells) + "</tr>"


def matrix_rows(matrix: VerdictMatrix) -> tuple[list[str], list[list[str]]]:
    """Headers and plain-text rows (Markdown, terminal): a missed value carries a ✗."""
    headers = (["target"] if matrix.per_target else []) + ["artifact (runtime)"] + [
        " ".join(filter(None, (column_title(b), column_limit(matrix, b)))) for b in matrix.columns]
    rows = [([row.target] if matrix.per_target else []) + [row.label]
            + [_marked(row.cells.get(b)) for b in matrix.columns] for row in matrix.rows]
    return headers, rows


def _marked(verdict: Optional[Verdict]) -> str:
    text = cell_text(verdict)
    return text if verdict is None or verdict.ok else f"{text} {MISSED_MARK}"


def matrix_text(matrix: VerdictMatrix) -> str:
    """A plain-text matrix for the terminal, columns padded to their widest cell."""
    headers, rows = matrix_rows(matrix)
    cells = [headers] + rows
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def short_matrix_text(verdicts: list[Verdict], width: int = 120, max_rows: int = 12) -> Optional[str]:
    """The matrix for the build's log, or None when it would not fit a terminal (then report.html has it)."""
    matrix = verdict_matrix(verdicts)
    text = matrix_text(matrix)
    fits = len(matrix.rows) <= max_rows and max(len(line) for line in text.splitlines()) <= width
    return text if fits else None
