"""Few labels and a big teacher: how does student and teacher accuracy grow with the label budget?

For labels per class N (data.labels_per_class) x subtasks x seeds, everything runs through the real pipeline
stages (edgesmith's Build, cached under --output, so a rerun only does what is missing):
  teacher rows   the ImageNet EfficientNet-Lite0 of configs/fashion_tops.yaml adapted on the N labels, as a linear
                 probe and fine-tuned (settings: adapt_small_n's choice on the labelled validation split);
                 a CNN teacher trained from scratch on the same N labels
  student rows   student_only (the N labels alone); kd / subdistill / fitnet / attention with the unlabelled pool
                 (data.unlabelled: rest, capped); kd and subdistill without the pool; kd with every label (N = all)
Each student distils from the fine-tuned foundation teacher; model selection uses only the budget's labelled
validation split; test accuracy is on the subtask's official test split.

    python -m bench label_efficiency                   # full scale (bench/README.md: time)
    python -m bench label_efficiency --quick           # tiny data, every row once
    python -m bench label_efficiency --rows student_only --student-only-epochs 100 --no-all-labels \
        --out bench/results/label_efficiency_student_only.json        # one row, its own schedule
Writes bench/results/label_efficiency.{json,txt,png} (accuracy vs labels per class, one line per method, the
teachers dashed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from bench._common import DEFAULT_CONFIG, ROOT, parse, parser, quiet_progress, save_figure, settings, write_results
from pipeline.config import config_with
from pipeline.runner import Build

QUIET = quiet_progress()
SUBTASKS = [                                    # the first three of distill_methods
    ["T-shirt/top", "Pullover", "Coat", "Shirt"],
    ["Sandal", "Sneaker", "Ankle boot"],
    ["T-shirt/top", "Dress", "Shirt", "Bag"],
]
POOL_METHODS = ["kd", "subdistill", "fitnet", "attention"]
NO_POOL_METHODS = ["kd", "subdistill"]
ROW_GROUPS = ["teachers", "student_only", "pool", "no_pool"]
TEACHER_ROWS = ["teacher: foundation, linear probe", "teacher: foundation, finetune", "teacher: CNN from scratch"]
# Sections whose stages the benchmark never reaches: left out, so they cannot fail a build.
UNUSED_SECTIONS = ("qat", "export", "validate", "release", "ood")


def parse_args(argv=None):
    p = parser("label_efficiency", __doc__)
    p.add_argument("--labels", type=int, nargs="+", default=[10, 50, 200])
    p.add_argument("--all-labels", action=argparse.BooleanOptionalAction, default=True, help="also kd with every label")
    p.add_argument("--subtasks", type=int, default=3)
    p.add_argument("--seeds", type=int, default=2, help="seeds per N (0, 1, ...)")
    p.add_argument("--seeds-at-50", type=int, default=3)
    p.add_argument("--pool-cap", type=int, default=12000, help="data.unlabelled_max_images")
    p.add_argument("--epochs", type=int, default=6, help="distill epochs (the default config has 12)")
    p.add_argument("--student-only-epochs", type=int, default=None,
                   help="epochs of the student_only row (default --epochs: at N <= 50 that is a dozen optimiser steps)")
    p.add_argument("--rows", nargs="+", default=ROW_GROUPS, choices=ROW_GROUPS, help="which rows to run")
    p.add_argument("--student", default="cnn_compact")
    p.add_argument("--test-per-class", type=int, default=None)
    p.add_argument("--pool-methods", nargs="*", default=POOL_METHODS)
    p.add_argument("--no-pool-methods", nargs="*", default=NO_POOL_METHODS)
    p.add_argument("--probe", default="classifier:100:0.01:0.0001", help="linear probe train_from:epochs:lr:wd")
    p.add_argument("--finetune", default="blocks.5:10:0.001:0.05", help="finetune train_from:epochs:lr:wd")
    p.add_argument("--cnn-epochs", type=int, default=30, help="from-scratch CNN teacher: epochs on the N labels")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default=str(ROOT / "builds" / "bench_label_efficiency"), help="cache root")
    args = parse(p, argv)
    if args.quick:      # 1 subtask, N = 8, 1 seed, 1 epoch, a tiny pool
        args.labels, args.all_labels, args.subtasks, args.seeds, args.seeds_at_50 = [8], False, 1, 1, 1
        args.pool_cap, args.epochs, args.test_per_class, args.student = 64, 1, 25, "cnn_tiny"
        args.pool_methods, args.no_pool_methods = ["kd", "subdistill"], ["kd"]
        args.probe, args.finetune, args.cnn_epochs = "classifier:2:0.01:0.0001", "blocks.6:1:0.001:0.05", 1
    return args


def adapt_settings(text: str) -> dict:
    train_from, epochs, lr, wd = text.split(":")
    method = "linear_probe" if train_from == "classifier" else "finetune"
    return {"method": method, "train_from": None if method == "linear_probe" else train_from, "epochs": int(epochs),
            "lr": float(lr), "weight_decay": float(wd), "batch_size": 32}


def config(args, classes: list[str], n: int | None, seed: int, adapt: dict | None = None, method: str = "kd",
           pool: bool = True, cnn_teacher: bool = False, epochs: int | None = None):
    name = "_".join(c.split("/")[0].split()[0].lower() for c in classes)
    overrides = {"build.name": f"le_{name}", "build.seed": seed, "build.output": args.output,
                 "build.threads": args.threads, "subtask": {"classes": classes}, "data.labels_per_class": n,
                 "student.arch": args.student, "distill.method": method, "distill.epochs": epochs or args.epochs}
    if pool:
        overrides.update({"data.unlabelled": "rest", "data.unlabelled_max_images": args.pool_cap})
    else:           # every label without a pool: the default config's data
        overrides.update({"data.unlabelled": "none" if n is not None else None, "data.unlabelled_max_images": None})
    if args.test_per_class:
        overrides["data.test_per_class"] = args.test_per_class
    if cnn_teacher:
        overrides["teacher"] = {"source": "train", "input": {"size": 28, "channels": 1},
                                "train": {"arch": "cnn_teacher", "epochs": args.cnn_epochs, "batch_size": 32}}
    elif adapt is not None:
        overrides["teacher.adapt"] = adapt
    if epochs:           # the same shape of schedule, stretched: the learning rate halves at a third and two thirds
        overrides["distill.lr_step_epochs"] = max(1, epochs // 3)
    return config_with(DEFAULT_CONFIG, overrides, remove=UNUSED_SECTIONS)


def build(cfg, until: str) -> dict[str, dict]:
    return {s["stage"]: s for s in Build(cfg).run(QUIET, until=until)}


def run_cell(args, classes: list[str], n: int | None, seed: int) -> list[dict]:
    """Every row for one (subtask, N, seed)."""
    rows, subtask = [], "/".join(c.split("/")[0] for c in classes)
    base = {"subtask": subtask, "labels_per_class": n if n is not None else "all", "seed": seed}
    finetune = adapt_settings(args.finetune)
    if n is None:                      # every label: kd only (the default config's data)
        cfg = config(args, classes, None, seed, None, "kd", pool=False)     # the default config's adaptation
        stages = build(cfg, "distill")
        return [{**base, "row": "kd (every label)", **student_metrics(stages)}]
    if "teachers" in args.rows:
        rows += teacher_rows(args, classes, n, seed, base, finetune)
    if "student_only" in args.rows:
        epochs = args.student_only_epochs
        stages = build(config(args, classes, n, seed, finetune, "student_only", pool=False, epochs=epochs), "distill")
        suffix = f", {epochs} epochs" if epochs and epochs != args.epochs else ""
        rows.append({**base, "row": f"student_only (labels alone{suffix})", **student_metrics(stages)})
    for method in args.pool_methods if "pool" in args.rows else []:
        rows.append({**base, "row": f"{method} + pool",
                     **student_metrics(build(config(args, classes, n, seed, finetune, method, pool=True), "distill"))})
    for method in args.no_pool_methods if "no_pool" in args.rows else []:
        rows.append({**base, "row": f"{method} (no pool)",
                     **student_metrics(build(config(args, classes, n, seed, finetune, method, pool=False), "distill"))})
    return rows


def teacher_rows(args, classes: list[str], n: int, seed: int, base: dict, finetune: dict) -> list[dict]:
    rows = []
    for label, adapt in (("linear probe", adapt_settings(args.probe)), ("finetune", finetune)):
        stages = build(config(args, classes, n, seed, adapt, "student_only", pool=False), "adapt")
        rows.append({**base, "row": f"teacher: foundation, {label}",
                     "test_acc": stages["adapt"]["metrics"]["teacher_subtask_test_acc"],
                     "adapt_val_acc": stages["adapt"]["metrics"]["adapt_best_val_acc"],
                     "wall_s": stages["adapt"]["wall_s"]})
    stages = build(config(args, classes, n, seed, None, "student_only", pool=False, cnn_teacher=True), "adapt")
    rows.append({**base, "row": "teacher: CNN from scratch", "test_acc": stages["adapt"]["metrics"]["teacher_subtask_test_acc"],
                 "wall_s": stages["teacher"]["wall_s"]})
    return rows


def student_metrics(stages: dict) -> dict:
    distill = stages["distill"]
    m = distill["metrics"]
    return {"test_acc": m["student_test_acc"], "val_acc": m["best_val_acc"], "teacher_test_acc": m["teacher_test_acc"],
            "wall_s": distill["wall_s"], "subspaces_s": stages.get("subspaces", {}).get("wall_s"),
            "img_per_s": m["train_images_per_s"], "transfer_images": m.get("transfer_images")}


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds per (row, N), per subtask and over the subtasks (mean of the subtask means)."""
    out = []
    keys = sorted({(r["row"], str(r["labels_per_class"])) for r in rows}, key=lambda k: (row_order(k[0]), _n(k[1])))
    for row, n in keys:
        mine = [r for r in rows if r["row"] == row and str(r["labels_per_class"]) == n]
        per_subtask = {}
        for r in mine:
            per_subtask.setdefault(r["subtask"], []).append(r["test_acc"])
        means = [statistics.mean(v) for v in per_subtask.values()]
        seeds_std = [statistics.stdev(v) for v in per_subtask.values() if len(v) > 1]
        walls = [r["wall_s"] for r in mine if r.get("wall_s")]
        speeds = [r["img_per_s"] for r in mine if r.get("img_per_s")]
        out.append({"row": row, "labels_per_class": n, "test_acc_mean": statistics.mean(means),
                    "seed_std_mean": statistics.mean(seeds_std) if seeds_std else None,
                    "per_subtask": {k: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else None,
                                        "seeds": len(v)} for k, v in per_subtask.items()},
                    "wall_s_mean": statistics.mean(walls) if walls else None,
                    "img_per_s_mean": statistics.mean(speeds) if speeds else None})
    return out


def row_order(row: str) -> int:
    if row.startswith("student_only"):
        row = "student_only (labels alone)"
    order = TEACHER_ROWS + ["student_only (labels alone)"] + [f"{m} + pool" for m in POOL_METHODS] + \
        [f"{m} (no pool)" for m in NO_POOL_METHODS] + ["kd (every label)"]
    return order.index(row) if row in order else len(order)


def _n(n: str) -> int:
    return 10 ** 9 if n == "all" else int(n)


def _cell(v: dict | None) -> str:
    if v is None:
        return f"{'':>22}"
    spread = "" if v["std"] is None else f" +- {v['std'] * 100:4.2f}"
    return f"{v['mean'] * 100:>13.2f}{spread:>9}"


def table(summary: list[dict]) -> str:
    subtasks = list(dict.fromkeys(s for r in summary for s in r["per_subtask"]))
    head = f"{'row':<34} {'N':>4}  {'mean':>6}  " + "  ".join(f"{s[:22]:>22}" for s in subtasks) + \
        f"  {'distill s':>9} {'img/s':>7}"
    lines = [head, "-" * len(head)]
    for r in summary:
        student = not r["row"].startswith("teacher")
        wall = f"{r['wall_s_mean']:>9.0f}" if student and r["wall_s_mean"] is not None else f"{'':>9}"
        speed = f"{r['img_per_s_mean']:>7.0f}" if r["img_per_s_mean"] else f"{'':>7}"
        lines.append(f"{r['row']:<34} {r['labels_per_class']:>4}  {r['test_acc_mean'] * 100:>6.2f}  "
                     + "  ".join(_cell(r["per_subtask"].get(s)) for s in subtasks) + f"  {wall} {speed}")
    return "\n".join(lines)


def plot(summary: list[dict], path: Path, stamp: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = sorted({r["row"] for r in summary}, key=row_order)
    for row in rows:
        points = sorted(((int(r["labels_per_class"]), r["test_acc_mean"] * 100) for r in summary
                         if r["row"] == row and r["labels_per_class"] != "all"))
        if points:
            ax.plot(*zip(*points), "--" if row.startswith("teacher") else "-", marker="o", label=row)
    ax.set_xscale("log")
    ax.set_xlabel("labels per class N")
    ax.set_ylabel("test accuracy, mean over subtasks (%)")
    ax.set_title("Label efficiency (teachers dashed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, stamp)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    start, rows = time.perf_counter(), []
    partial = args.out.with_suffix(".partial.jsonl")      # rows so far: an interrupted run keeps what it measured
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_text("")
    for classes in SUBTASKS[:args.subtasks]:
        for n in args.labels:
            for seed in range(args.seeds_at_50 if n == 50 else args.seeds):
                rows += _saved(partial, run_cell(args, classes, n, seed))
                print(f"[{time.perf_counter() - start:6.0f} s] {classes} N={n} seed={seed} done", flush=True)
        if args.all_labels:
            for seed in range(args.seeds):
                rows += _saved(partial, run_cell(args, classes, None, seed))
    summary = summarise(rows)
    text = table(summary)
    print(text)
    result = {"args": settings(args), "wall_s": round(time.perf_counter() - start, 1), "summary": summary,
              "runs": rows}
    stamp = write_results(args.out, result, args.command, table=text)
    plot(summary, args.out.with_suffix(".png"), stamp)
    partial.unlink()
    return result


def _saved(path: Path, rows: list[dict]) -> list[dict]:
    with path.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


if __name__ == "__main__":
    main()
