"""Benchmark: few labels and a big teacher. Student and teacher accuracy against the label budget.

For labels per class N (data.labels_per_class) x subtasks x seeds, everything runs through the real pipeline
stages (edgesmith's Build, cached under --output, so a rerun only does what is missing):
  teacher rows   the ImageNet EfficientNet-Lite0 of configs/fashion_tops.yaml adapted on the N labels, as a linear
                 probe and fine-tuned (settings: bench/adapt_small_n.py's choice on the labelled validation split);
                 a CNN teacher trained from scratch on the same N labels
  student rows   student_only (the N labels alone); kd / subdistill / fitnet / attention with the unlabelled pool
                 (data.unlabelled: rest, capped); kd and subdistill without the pool; kd with every label (N = all)
Each student distils from the fine-tuned foundation teacher; model selection uses only the budget's labelled
validation split; test accuracy is on the subtask's official test split.
  view bank rows kd and subdistill with the pool and data.views: K (augment: true: flips and small shifts, K seeded
                 views per image whose teacher targets are computed once), at N in --views-at (default 50)

    flock /work/heavy.lock .venv/bin/python bench/label_efficiency.py          # full scale (see the docstring of
                                                                                  # the committed results for time)
    .venv/bin/python bench/label_efficiency.py --quick                         # smoke run, tiny data
    .venv/bin/python bench/label_efficiency.py --rows student_only --student-only-epochs 100 --no-all-labels \
        --out bench/results/label_efficiency_student_only.json                   # one row, its own schedule
Writes bench/results/label_efficiency.{json,txt,png} (accuracy vs labels per class, one line per method, the
teachers dashed).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

from rich.console import Console

from pipeline.config import parse_config
from pipeline.progress import ProgressDisplay
from pipeline.runner import Build

DEFAULT_CONFIG = ROOT / "configs" / "fashion_tops.yaml"
RESULTS = ROOT / "bench" / "results" / "label_efficiency.json"
QUIET = ProgressDisplay(Console(quiet=True), enabled=False)
SUBTASKS = [                                    # the first three of bench/distill_methods.py
    ["T-shirt/top", "Pullover", "Coat", "Shirt"],
    ["Sandal", "Sneaker", "Ankle boot"],
    ["T-shirt/top", "Dress", "Shirt", "Bag"],
]
POOL_METHODS = ["kd", "subdistill", "fitnet", "attention"]
NO_POOL_METHODS = ["kd", "subdistill"]
VIEW_METHODS = ["kd", "subdistill"]
ROW_GROUPS = ["teachers", "student_only", "pool", "no_pool", "views"]
TEACHER_ROWS = ["teacher: foundation, linear probe", "teacher: foundation, finetune", "teacher: CNN from scratch"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    p.add_argument("--view-methods", nargs="*", default=VIEW_METHODS)
    p.add_argument("--views", type=int, nargs="*", default=[4], help="view bank sizes K (data.views)")
    p.add_argument("--views-at", type=int, nargs="*", default=[50], help="labels per class N with view bank rows")
    p.add_argument("--views-seeds", type=int, default=1, help="seeds with view bank rows (each K costs K teacher "
                   "passes over the pool)")
    p.add_argument("--probe", default="classifier:100:0.01:0.0001", help="linear probe train_from:epochs:lr:wd")
    p.add_argument("--finetune", default="blocks.5:10:0.001:0.05", help="finetune train_from:epochs:lr:wd")
    p.add_argument("--cnn-epochs", type=int, default=30, help="from-scratch CNN teacher: epochs on the N labels")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default=str(ROOT / "builds" / "bench_label_efficiency"), help="cache root")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 subtask, N = 8, 1 seed, 1 epoch, tiny pool")
    p.add_argument("--out", type=Path, default=None, help=f"default {RESULTS.relative_to(ROOT)} (--quick: *_quick.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.labels, args.all_labels, args.subtasks, args.seeds, args.seeds_at_50 = [8], False, 1, 1, 1
        args.pool_cap, args.epochs, args.test_per_class, args.student = 64, 1, 25, "cnn_tiny"
        args.pool_methods, args.no_pool_methods = ["kd", "subdistill"], ["kd"]
        args.view_methods, args.views, args.views_at = ["kd"], [2], [8]
        args.probe, args.finetune, args.cnn_epochs = "classifier:2:0.01:0.0001", "blocks.6:1:0.001:0.05", 1
    if args.out is None:
        args.out = RESULTS.with_name("label_efficiency_quick.json") if args.quick else RESULTS
    return args


def adapt_settings(text: str) -> dict:
    train_from, epochs, lr, wd = text.split(":")
    method = "linear_probe" if train_from == "classifier" else "finetune"
    return {"method": method, "train_from": None if method == "linear_probe" else train_from, "epochs": int(epochs),
            "lr": float(lr), "weight_decay": float(wd), "batch_size": 32}


def config(args, classes: list[str], n: int | None, seed: int, adapt: dict | None = None, method: str = "kd",
           pool: bool = True, cnn_teacher: bool = False, views: int | None = None, epochs: int | None = None):
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    name = "_".join(c.split("/")[0].split()[0].lower() for c in classes)
    raw["build"].update({"name": f"le_{name}", "seed": seed, "output": args.output, "threads": args.threads})
    raw["subtask"] = {"classes": classes}
    raw["data"].update({"labels_per_class": n, "unlabelled": "rest" if pool else "none",
                        "unlabelled_max_images": args.pool_cap if pool else None})
    if views is not None:
        raw["data"].update({"augment": True, "views": views})
    if n is None and not pool:
        raw["data"].update({"unlabelled": None, "unlabelled_max_images": None})
    if args.test_per_class:
        raw["data"]["test_per_class"] = args.test_per_class
    if cnn_teacher:
        raw["teacher"] = {"source": "train", "input": {"size": 28, "channels": 1},
                          "train": {"arch": "cnn_teacher", "epochs": args.cnn_epochs, "batch_size": 32}}
    elif adapt is not None:
        raw["teacher"]["adapt"] = adapt
    raw["student"]["arch"] = args.student
    raw["distill"].update({"method": method, "epochs": epochs or args.epochs})
    if epochs:           # the same shape of schedule, stretched: the learning rate halves at a third and two thirds
        raw["distill"]["lr_step_epochs"] = max(1, epochs // 3)
    for section in ("qat", "export", "validate", "release", "ood"):
        raw.pop(section, None)
    return parse_config(raw)


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
    with_views = "views" in args.rows and n in args.views_at and seed < args.views_seeds
    for k in args.views if with_views else []:
        for method in args.view_methods:
            cfg = config(args, classes, n, seed, finetune, method, pool=True, views=k)
            rows.append({**base, "row": f"{method} + pool + views K={k}", **student_metrics(build(cfg, "distill"))})
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
        [f"{m} (no pool)" for m in NO_POOL_METHODS] + \
        [f"{m} + pool + views K={k}" for k in (1, 2, 4, 8, 16) for m in VIEW_METHODS] + ["kd (every label)"]
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


def plot(summary: list[dict], path: Path) -> None:
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
    fig.savefig(path, dpi=110)
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
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "environment": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()},
              "wall_s": round(time.perf_counter() - start, 1), "summary": summary, "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".txt").write_text(text + "\n")
    plot(summary, args.out.with_suffix(".png"))
    partial.unlink()
    return result


def _saved(path: Path, rows: list[dict]) -> list[dict]:
    with path.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


if __name__ == "__main__":
    main()
