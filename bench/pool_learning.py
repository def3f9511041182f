"""Learning more from the unlabelled pool under a label budget: the teacher's soft answers alone (distillation on
labelled + pool images) vs. adding FixMatch consistency on the pool (distill.consistency), the teacher's confident
pseudo-labels under strong augmentation (distill.pseudo_labels), or both.

Every run goes through the real pipeline stages (edgesmith's Build, cached under --output, so a rerun only does
what is missing), with the configs of the label-efficiency benchmark (its teacher adaptation, student and pool;
bench/label_efficiency.py). Thresholds and weights are chosen on the budget's labelled validation split (the val
column); test accuracy is on the subtask's official test split.

    python -m bench pool_learning                       # N = 10 and 50, three subtasks, three seeds
    python -m bench pool_learning --quick               # tiny data, every row once
    python -m bench pool_learning --labels 50 --subtasks 1 --seeds 1 --consistency 0.95:1 0.8:1
Writes bench/results/pool_learning.{json,txt,png}.
"""

from __future__ import annotations

import statistics
import time

from bench import label_efficiency as le
from bench._common import ROOT, parse, parser, save_figure, settings, write_results
from pipeline.config import config_with


def parse_args(argv=None):
    p = parser("pool_learning", __doc__)
    p.add_argument("--labels", type=int, nargs="+", default=[10, 50])
    p.add_argument("--subtasks", type=int, default=3)
    p.add_argument("--seeds", type=int, default=3, help="seeds per N (0, 1, ...)")
    p.add_argument("--method", default="attention", help="distill.method of every row")
    p.add_argument("--epochs", type=int, default=12, help="distill epochs (the 50-label config has 12)")
    p.add_argument("--pool-cap", type=int, default=12000, help="data.unlabelled_max_images")
    p.add_argument("--consistency", nargs="*", default=["0.95:1"], metavar="THRESHOLD:WEIGHT",
                   help="distill.consistency rows (none: no such row)")
    p.add_argument("--pseudo", nargs="*", default=["0.9:1"], metavar="THRESHOLD:WEIGHT",
                   help="distill.pseudo_labels rows (none: no such row)")
    p.add_argument("--both", action=argparse_bool(), default=True,
                   help="also a row with the first --consistency and the first --pseudo together")
    p.add_argument("--student", default="cnn_compact")
    p.add_argument("--test-per-class", type=int, default=None)
    p.add_argument("--finetune", default="blocks.5:10:0.001:0.05", help="teacher finetune train_from:epochs:lr:wd")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default=str(ROOT / "builds" / "bench_label_efficiency"),
                   help="cache root (the label-efficiency benchmark's: its adapted teachers are reused)")
    args = parse(p, argv)
    if args.quick:      # 1 subtask, N = 8, 1 seed, 1 epoch, a tiny pool
        args.labels, args.subtasks, args.seeds, args.epochs = [8], 1, 1, 1
        args.pool_cap, args.test_per_class, args.student, args.method = 64, 25, "cnn_tiny", "kd"
        args.finetune = "blocks.6:1:0.001:0.05"
    return args


def argparse_bool():
    import argparse

    return argparse.BooleanOptionalAction


def option(text: str) -> dict:
    threshold, weight = text.split(":")
    return {"threshold": float(threshold), "weight": float(weight)}


def variants(args) -> list[tuple[str, dict]]:
    """(row name, distill overrides) of every row, the baseline first."""
    rows = [("pool (teacher's answers)", {})]
    rows += [(f"+ consistency {c}", {"distill.consistency": option(c)}) for c in args.consistency]
    rows += [(f"+ pseudo-labels {p}", {"distill.pseudo_labels": option(p)}) for p in args.pseudo]
    if args.both and args.consistency and args.pseudo:
        rows.append((f"+ both {args.consistency[0]} / {args.pseudo[0]}",
                     {"distill.consistency": option(args.consistency[0]),
                      "distill.pseudo_labels": option(args.pseudo[0])}))
    return rows


def run_cell(args, classes: list[str], n: int, seed: int) -> list[dict]:
    base = {"subtask": "/".join(c.split("/")[0] for c in classes), "labels_per_class": n, "seed": seed}
    le_args = _le_args(args)
    base_cfg = le.config(le_args, classes, n, seed, le.adapt_settings(args.finetune), args.method, pool=True,
                         epochs=args.epochs)
    rows = []
    for name, overrides in variants(args):
        stages = le.build(config_with(base_cfg, overrides), "distill")
        rows.append({**base, "row": name, **le.student_metrics(stages), **confident(stages["distill"])})
    return rows


def _le_args(args):
    """The label-efficiency benchmark's config arguments from ours."""
    import argparse

    return argparse.Namespace(output=args.output, threads=args.threads, student=args.student, epochs=args.epochs,
                              pool_cap=args.pool_cap, test_per_class=args.test_per_class)


def confident(distill: dict) -> dict:
    """The fraction of pool images above each threshold in the last epoch."""
    last = distill["metrics"]["history"][-1]
    return {k: last[k] for k in ("consistency_confident", "pseudo_confident") if k in last}


def summarise(rows: list[dict]) -> list[dict]:
    """Mean over seeds per (row, N), per subtask and over the subtasks (mean of the subtask means)."""
    out = []
    names = list(dict.fromkeys(r["row"] for r in rows))
    for n in sorted({r["labels_per_class"] for r in rows}):
        for name in names:
            mine = [r for r in rows if r["row"] == name and r["labels_per_class"] == n]
            if not mine:
                continue
            per_subtask: dict[str, list[dict]] = {}
            for r in mine:
                per_subtask.setdefault(r["subtask"], []).append(r)
            out.append({"row": name, "labels_per_class": n, "test_acc_mean": _mean(per_subtask, "test_acc"),
                        "val_acc_mean": _mean(per_subtask, "val_acc"),
                        "teacher_test_acc_mean": _mean(per_subtask, "teacher_test_acc"),
                        "per_subtask": {k: statistics.mean(r["test_acc"] for r in v) for k, v in per_subtask.items()},
                        "seeds": max(len(v) for v in per_subtask.values()),
                        "wall_s_mean": statistics.mean(r["wall_s"] for r in mine)})
    return out


def _mean(per_subtask: dict[str, list[dict]], key: str) -> float:
    """The mean over subtasks of the mean over seeds."""
    return statistics.mean(statistics.mean(r[key] for r in rows) for rows in per_subtask.values())


def table(summary: list[dict]) -> str:
    subtasks = list(dict.fromkeys(s for r in summary for s in r["per_subtask"]))
    head = (f"{'row':<40} {'N':>4} {'seeds':>5}  {'test':>6}  {'val':>6}  {'teacher':>7}  "
            + "  ".join(f"{s[:22]:>22}" for s in subtasks) + f"  {'distill s':>9}")
    lines = [head, "-" * len(head)]
    for r in summary:
        lines.append(f"{r['row']:<40} {r['labels_per_class']:>4} {r['seeds']:>5}  {r['test_acc_mean'] * 100:>6.2f}  "
                     f"{r['val_acc_mean'] * 100:>6.2f}  {r['teacher_test_acc_mean'] * 100:>7.2f}  "
                     + "  ".join(f"{r['per_subtask'][s] * 100:>22.2f}" if s in r["per_subtask"] else f"{'':>22}"
                                 for s in subtasks) + f"  {r['wall_s_mean']:>9.0f}")
    return "\n".join(lines)


def plot(summary: list[dict], path, stamp: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({r["labels_per_class"] for r in summary})
    names = list(dict.fromkeys(r["row"] for r in summary))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [next((r["test_acc_mean"] * 100 for r in summary if r["row"] == name and r["labels_per_class"] == n),
                       float("nan")) for n in labels]
        ax.bar([j + i * width for j in range(len(labels))], values, width, label=name)
    teachers = [next(r["teacher_test_acc_mean"] * 100 for r in summary if r["labels_per_class"] == n) for n in labels]
    for j, t in enumerate(teachers):
        ax.hlines(t, j - width / 2, j + 0.8 - width / 2, colors="black", linestyles="--",
                  label="teacher" if j == 0 else None)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], [f"N = {n}" for n in labels])
    ax.set_ylabel("student test accuracy, mean over subtasks (%)")
    ax.set_ylim(max(0, min(t for t in teachers) - 25), 100)
    ax.set_title("Learning from the unlabelled pool")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, stamp)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    start, rows = time.perf_counter(), []
    partial = args.out.with_suffix(".partial.jsonl")
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_text("")
    for classes in le.SUBTASKS[:args.subtasks]:
        for n in args.labels:
            for seed in range(args.seeds):
                rows += le._saved(partial, run_cell(args, classes, n, seed))
                print(f"[{time.perf_counter() - start:6.0f} s] {classes} N={n} seed={seed} done", flush=True)
    summary = summarise(rows)
    text = table(summary)
    print(text)
    result = {"args": settings(args), "wall_s": round(time.perf_counter() - start, 1), "summary": summary, "runs": rows}
    stamp = write_results(args.out, result, args.command, table=text)
    plot(summary, args.out.with_suffix(".png"), stamp)
    partial.unlink()
    return result


if __name__ == "__main__":
    main()
