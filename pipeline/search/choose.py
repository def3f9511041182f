"""From stored trials to one student: the trials table, budgets applied (deterministic figures first: MACs,
parameters, INT8 size, TFLite Micro arena and flash; then the measured latency with interleaved re-measurement near
the limit), finalists, the choice, the Pareto fronts."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional

from .config import SearchBudgets
from .space import Candidate


@dataclass
class Row:
    """One trained (or skipped) candidate of the proxy round, and what the finalists' rounds added."""

    trial: int
    arch: str
    resolution: int
    state: str                       # complete | pruned | skipped
    macs: int
    params: int
    proxy_val_acc: Optional[float]   # best validation top-1 on the proxy schedule (pruned: at the epoch it stopped)
    epochs: int
    size_kb: Optional[float] = None
    p99_ms: list[float] = field(default_factory=list)     # one figure per measuring round
    full_val_acc: Optional[float] = None
    artifact: Optional[str] = None
    skipped: str = ""
    weights: Optional[str] = None
    arena_kb: Optional[float] = None     # TFLite Micro tensor arena of the INT8 .tflite (the MCU budgets only)
    flash_kb: Optional[float] = None     # its flatbuffer
    tflite_s: Optional[float] = None     # seconds the .tflite conversion and arena measurement took
    tflite_error: str = ""               # why this candidate has no .tflite (a converter failure)
    timed_on: Optional[str] = None       # search.latency.target that timed p99_ms

    @property
    def candidate(self) -> Candidate:
        return Candidate(self.arch, self.resolution)

    @property
    def p99(self) -> Optional[float]:
        return statistics.median(self.p99_ms) if self.p99_ms else None

    @property
    def noise(self) -> Optional[float]:
        """Spread of the rounds' p99 relative to their median."""
        return (max(self.p99_ms) - min(self.p99_ms)) / self.p99 if len(self.p99_ms) > 1 else None

    def to_json(self) -> dict:
        return {**asdict(self), "p99_median_ms": self.p99, "p99_noise": self.noise}

    @classmethod
    def from_json(cls, raw: dict) -> "Row":
        """A row of trials.json (which adds derived columns) back as a Row; columns it lacks take their default."""
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})


def rows_of(proxy_trials, full_trials) -> list[Row]:
    """The table of a study: trained and skipped candidates (twins and failed runs left out)."""
    full = {(t.user_attrs["candidate"]["arch"], t.user_attrs["candidate"]["resolution"]): t.value
            for t in full_trials if t.state.name == "COMPLETE"}
    rows = []
    for t in proxy_trials:
        attrs = t.user_attrs
        if "candidate" not in attrs or "twin_of" in attrs or t.state.name not in ("COMPLETE", "PRUNED"):
            continue
        c = attrs["candidate"]
        history = attrs.get("history", [])
        state = "skipped" if attrs.get("skipped") else t.state.name.lower()
        proxy = t.value if t.state.name == "COMPLETE" else (max(history) if history else None)
        rows.append(Row(t.number, c["arch"], c["resolution"], state, attrs.get("macs", 0), attrs.get("params", 0),
                        proxy, len(history), attrs.get("size_kb"), [], full.get((c["arch"], c["resolution"])),
                        attrs.get("artifact"), attrs.get("skipped", ""), attrs.get("weights")))
    return sorted(rows, key=lambda r: r.trial)


def exact_figures(row: Row, budgets: SearchBudgets) -> list[tuple[str, Optional[float], Optional[float]]]:
    """(budget, value, limit) of the figures that are exact properties of the candidate: they decide before latency."""
    return [("max_macs", row.macs, budgets.max_macs), ("max_params", row.params, budgets.max_params),
            ("max_size_kb", row.size_kb, budgets.max_size_kb), ("max_arena_kb", row.arena_kb, budgets.max_arena_kb),
            ("max_flash_kb", row.flash_kb, budgets.max_flash_kb)]


def misses(row: Row, budgets: SearchBudgets, final: bool = True) -> list[str]:
    """The budgets `row` misses, each as 'name value > limit'. Accuracy is judged on the full schedule only."""
    out = []
    for name, value, limit in [*exact_figures(row, budgets), ("max_p99_ms", row.p99, budgets.max_p99_ms)]:
        if limit is not None and value is not None and value > limit:
            out.append(f"{name} {_fmt(value)} > {_fmt(limit)}")
    if budgets.needs_tflite and row.tflite_error:
        out.append(f"no INT8 .tflite for max_arena_kb / max_flash_kb: {row.tflite_error[:160]}")
    if final and budgets.min_val_acc is not None and row.full_val_acc is not None and row.full_val_acc < budgets.min_val_acc:
        out.append(f"min_val_acc {row.full_val_acc:.4f} < {budgets.min_val_acc}")
    return out


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def ranked(rows: list[Row], key: Callable[[Row], Optional[float]]) -> list[Row]:
    """Best first by `key` (higher is better); ties: fewer MACs, then the earlier trial."""
    return sorted([r for r in rows if key(r) is not None], key=lambda r: (-key(r), r.macs, r.trial))


def near_limit(row: Row, budgets: SearchBudgets, margin: float) -> bool:
    limit = budgets.max_p99_ms
    return limit is not None and row.p99 is not None and abs(row.p99 - limit) <= margin * limit


def remeasure(rows: list[Row], rounds: int, measure: Callable[[list[Row]], list[float]]) -> None:
    """Measure until every row has `rounds` figures, interleaved (one round over all rows, then the next), so that
    a slow moment of the machine hits every candidate alike rather than one. `measure` times a round's rows at
    once (on a remote target: one connection per round)."""
    for _ in range(rounds):
        due = [row for row in rows if len(row.p99_ms) < rounds]
        for row, value in zip(due, measure(due) if due else []):
            row.p99_ms.append(value)


def finalists(rows: list[Row], budgets: SearchBudgets, count: int, rounds: int, margin: float,
              measure: Callable[[list[Row]], list[float]]) -> list[Row]:
    """The `count` best proxy candidates that meet every budget. Their p99 is the median of `rounds` interleaved
    figures; one within `margin` of max_p99_ms gets `rounds` more before it is judged."""
    ranked_rows = ranked([r for r in rows if r.state == "complete"], lambda r: r.proxy_val_acc)
    eligible = [r for r in ranked_rows if all(m.startswith("max_p99_ms") for m in misses(r, budgets, final=False))]
    chosen: list[Row] = []
    while eligible and len(chosen) < count:
        batch, eligible = eligible[: count - len(chosen)], eligible[count - len(chosen):]
        remeasure(batch, rounds, measure)
        remeasure([r for r in batch if near_limit(r, budgets, margin)], 2 * rounds, measure)
        chosen += [r for r in batch if not misses(r, budgets, final=False)]
    return chosen


def choice(rows: list[Row], budgets: SearchBudgets) -> Optional[Row]:
    """The finalist with the best full-schedule validation accuracy among those meeting every budget."""
    ok = [r for r in rows if r.full_val_acc is not None and not misses(r, budgets)]
    best = ranked(ok, lambda r: r.full_val_acc)
    return best[0] if best else None


def closest(rows: list[Row], budgets: SearchBudgets, n: int = 8) -> list[tuple[Row, list[str]]]:
    """Candidates nearest to meeting the budgets: fewest misses, then the smallest total relative excess."""
    def excess(row: Row) -> float:
        total = 0.0
        for _, value, limit in [*exact_figures(row, budgets), ("max_p99_ms", row.p99, budgets.max_p99_ms)]:
            if limit is not None and value is not None and value > limit:
                total += value / limit - 1
        return total

    scored = [(r, misses(r, budgets)) for r in rows]
    return sorted(scored, key=lambda rm: (rm[0].state != "complete", len(rm[1]), excess(rm[0]), rm[0].trial))[:n]


def why_not(row: Row, missed: list[str]) -> str:
    if missed:
        return "; ".join(missed)
    if row.state == "pruned":
        return f"stopped by successive halving after {row.epochs} epoch(s)"
    return "within budget but not among the finalists' best" if row.full_val_acc is None else "below min_val_acc"


def current(rows: list[Row], budgets: SearchBudgets) -> list[Row]:
    """The rows that speak for the current budgets: a candidate skipped untrained under an earlier, tighter budget
    is left out when it now fits (it was never trained), and whenever it was trained since."""
    trained = {r.candidate for r in rows if r.state != "skipped"}
    return [r for r in rows if r.state != "skipped" or (r.candidate not in trained and misses(r, budgets, final=False))]


def pareto(rows: list[Row], cost: Callable[[Row], Optional[float]], acc: Callable[[Row], Optional[float]]) -> list[Row]:
    """Rows no other row beats on both accuracy (higher) and cost (lower)."""
    points = [r for r in rows if cost(r) is not None and acc(r) is not None]
    front = [r for r in points if not any(acc(o) >= acc(r) and cost(o) <= cost(r) and (acc(o) > acc(r) or cost(o) < cost(r))
                                          for o in points)]
    return sorted(front, key=cost)


def best_accuracy(row: Row) -> Optional[float]:
    return row.full_val_acc if row.full_val_acc is not None else row.proxy_val_acc


def write_fronts(rows: list[Row], folder: Path) -> dict:
    """front.json (accuracy vs MACs and vs measured p99) and front.png."""
    fronts = front_trials(rows)
    (Path(folder) / "front.json").write_text(json.dumps(fronts, indent=2) + "\n")
    figure = fronts_figure(rows, fronts)
    figure.savefig(Path(folder) / "front.png", dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return fronts


def front_trials(rows: list[Row]) -> dict:
    return {"macs": [r.trial for r in pareto(rows, lambda r: r.macs, best_accuracy)],
            "p99_ms": [r.trial for r in pareto(rows, lambda r: r.p99, best_accuracy)]}


def fronts_figure(rows: list[Row], fronts: dict):
    """Validation accuracy against MACs and against measured p99: every trial, the fronts, the full-schedule runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    by_trial = {r.trial: r for r in rows}
    from ..validation.targets import timed_label

    timed_on = next((r.timed_on for r in rows if r.timed_on), None)
    p99_label = f"INT8 ONNX p99 on {timed_label(timed_on)} (ms)" if timed_on else "INT8 ONNX p99 (ms)"
    for ax, key, label in ((axes[0], "macs", "MACs per image (M)"), (axes[1], "p99_ms", p99_label)):
        value = (lambda r: r.macs / 1e6) if key == "macs" else (lambda r: r.p99)
        pts = [r for r in rows if value(r) is not None and best_accuracy(r) is not None]
        ax.scatter([value(r) for r in pts], [best_accuracy(r) for r in pts], s=14, c="#9aa5b1", label="trials")
        front = [by_trial[t] for t in fronts[key]]
        ax.plot([value(r) for r in front], [best_accuracy(r) for r in front], "-o", c="#d9480f", ms=4, label="front")
        full = [r for r in pts if r.full_val_acc is not None]
        ax.scatter([value(r) for r in full], [r.full_val_acc for r in full], marker="s", s=28, facecolors="none",
                   edgecolors="#1864ab", label="full schedule")
        ax.set_xlabel(label)
        ax.set_ylabel("validation top-1")
        ax.grid(alpha=0.3)
    if any(r.macs > 0 and best_accuracy(r) is not None for r in rows):     # log scale needs a point to scale
        axes[0].set_xscale("log")
        axes[0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig
