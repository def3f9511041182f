"""Random or suggested labels: does choosing which images to label (edgesmith suggest-labels) beat a random budget?

At N labels per subtask class on average (N x classes images), x subtasks x seeds, through the real pipeline
(edgesmith's Build, cached under --output) with configs/fashion_tops_50labels.yaml's recipe (adapt, then distill
with the unlabelled pool):
  random              today's seeded budget: data.labels_per_class N (N per class, drawn with the dataset's labels)
  suggested           cold-start suggest-labels (TypiClust) over every training image (capped like the pool) asks
                      for K = N x classes images; the dataset's true labels play the annotator, who leaves images of
                      other classes unlabelled -> data.labels_file (so fewer than K labels, as for a real user)
  suggested, subtask  the same over the subtask's training images only (an annotator whose pool holds only the
                      device's classes): K labels, like random
  every label         the reference: configs/fashion_tops.yaml (every training label, its own recipe) on the same
                      subtask, seed 0 only (--reference / --no-reference); --quick: the tiny config
A labelling with a class under 2 labels cannot build (it is recorded with its reason). Test accuracy is on the
subtask's official test split; model selection uses only the held-out labelled images. The table gives, per
subtask, the mean and the spread (sample standard deviation) over seeds, and each row's gap to the reference.

    python -m bench label_suggestions                      # full scale (hours on 2 cores)
    python -m bench label_suggestions --quick              # the tiny config, one cell
    python -m bench label_suggestions --rows random --set teacher.adapt.heads=5 --no-reference \
        --out bench/results/label_suggestions_heads.json  # one recipe change, the same labels and seeds
    python -m bench label_suggestions --seeds 3 --keep-runs    # a third seed; the first two taken from the file
Writes bench/results/label_suggestions.{json,txt,png}.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import statistics
import time
from pathlib import Path

import numpy as np

from bench._common import DEFAULT_CONFIG, ROOT, TINY_CONFIG, parse, parser, quiet_progress, save_figure, settings, write_results
from pipeline.config import config_with, parse_overrides
from pipeline.data.for_config import subtask_data
from pipeline.errors import DataError
from pipeline.runner import Build

QUIET = quiet_progress()
RECIPE = ROOT / "configs" / "fashion_tops_50labels.yaml"
SUBTASKS = [                                    # bench/label_efficiency.py's
    ["T-shirt/top", "Pullover", "Coat", "Shirt"],
    ["Sandal", "Sneaker", "Ankle boot"],
    ["T-shirt/top", "Dress", "Shirt", "Bag"],
]
ROWS = ["random", "suggested", "suggested, subtask"]
REFERENCE = "every label"
UNUSED_SECTIONS = ("qat", "export", "validate", "release", "ood")


def parse_args(argv=None):
    p = parser("label_suggestions", __doc__)
    p.add_argument("--labels", type=int, nargs="+", default=[10, 50], help="N: labels per class on average")
    p.add_argument("--subtasks", type=int, default=3)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                   help="also the student with every label (configs/fashion_tops.yaml), once per subtask")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the recipe (not of the reference), as edgesmith build --set")
    p.add_argument("--pool-cap", type=int, default=12000, help="data.unlabelled_max_images (and the suggest pool's cap)")
    p.add_argument("--keep-runs", action="store_true",
                   help="take the runs already in --out (same row, subtask, N and seed) instead of building them "
                        "again: adds seeds or rows to a result; the file keeps the earlier stamps under 'kept_from'")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default=str(ROOT / "builds" / "bench_label_suggestions"), help="cache root")
    args = parse(p, argv)
    args.config, args.reference_config = RECIPE, DEFAULT_CONFIG
    args.recipe_overrides = parse_overrides(args.overrides)
    if args.quick:      # the tiny config (a CNN teacher from scratch on the labels), 1 subtask, N = 8, 1 seed
        args.config, args.labels, args.subtasks, args.seeds, args.pool_cap = TINY_CONFIG, [8], 1, 1, 200
        args.reference_config = TINY_CONFIG
    args.recipe_sha256 = hashlib.sha256(Path(args.config).read_bytes()).hexdigest()
    # what --keep-runs compares: the recipe as parsed, with the --set overrides applied, so that a comment edited in
    # the file, or a key moved from --set into the file, still counts as the same recipe
    args.recipe_digest = config_with(args.config, args.recipe_overrides, remove=UNUSED_SECTIONS).digest()
    return args


def _build_name(classes: list[str]) -> str:
    return "_".join(c.split("/")[0].split()[0].lower() for c in classes)


def _subtask_label(classes: list[str]) -> str:
    return "/".join(c.split("/")[0] for c in classes)


def reference_row(args, classes: list[str]) -> dict:
    """The default config's student on the same subtask with every training label: what the budget is measured
    against."""
    cfg = config_with(args.reference_config, {"build.name": f"ref_{_build_name(classes)}", "build.output": args.output,
                                       "build.threads": args.threads, "subtask": {"classes": classes}},
                      remove=UNUSED_SECTIONS)
    stages = {s["stage"]: s for s in Build(cfg).run(QUIET, until="distill")}
    m, data = stages["distill"]["metrics"], subtask_data(cfg)
    return {"row": REFERENCE, "subtask": _subtask_label(classes), "n": "all", "seed": 0,
            "labels": len(data.train) + len(data.val), "test_acc": m["student_test_acc"],
            "teacher_test_acc": m["teacher_test_acc"], "wall_s": round(sum(s["wall_s"] for s in stages.values()), 1)}


def config(args, classes: list[str], seed: int, **data):
    overrides = {"build.name": f"ls_{_build_name(classes)}", "build.seed": seed, "build.output": args.output,
                 "build.threads": args.threads, "subtask": {"classes": classes}, "data.labels_per_class": None,
                 "data.unlabelled": "rest", "data.unlabelled_max_images": args.pool_cap,
                 **{f"data.{k}": v for k, v in data.items()}, **args.recipe_overrides}
    return config_with(args.config, overrides, remove=UNUSED_SECTIONS)


def suggested_labels(args, classes: list[str], n: int, seed: int, subtask_only: bool) -> tuple[Path, int]:
    """suggest-labels without labels, the dataset's labels as the annotator; returns the labels file and the
    number of images suggested (looked at)."""
    from pipeline.data import load_dataset
    from pipeline.suggest import Candidates, candidates, rank

    cfg = config(args, classes, seed)
    count = n * len(classes)
    cand = candidates(cfg)
    dataset = load_dataset(cfg.data)
    truth = [dataset.class_names[c] for c in dataset.train.labels]
    if subtask_only:       # the annotator's pool holds only the subtask's images
        keep = [i for i, image_id in enumerate(cand.ids) if truth[int(image_id)] in classes]
        cand = Candidates(cand.images[keep], [cand.ids[i] for i in keep], None, None)
    suggestions = rank(cfg, cand, count, QUIET)
    tag = "subtask" if subtask_only else "all"
    path = Path(args.output) / "labels" / f"{cfg.build.name}_n{n}_seed{seed}_{tag}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "label"])
        for s in suggestions:
            name = truth[int(s.image)]
            writer.writerow([s.image, name if name in classes else ""])
    return path, count


def run_row(args, row: str, classes: list[str], n: int, seed: int) -> dict:
    base = {"row": row, "subtask": _subtask_label(classes), "n": n, "seed": seed}
    if row == "random":
        cfg, looked_at = config(args, classes, seed, labels_per_class=n), None
    else:
        path, looked_at = suggested_labels(args, classes, n, seed, subtask_only=row.endswith("subtask"))
        cfg = config(args, classes, seed, labels_file=str(path))
    try:
        subtask_data(cfg)            # the labels file is checked before any stage runs
        stages = {s["stage"]: s for s in Build(cfg).run(QUIET, until="distill")}
    except DataError as exc:         # e.g. a class with fewer than 2 labels among the suggestions
        return {**base, "error": exc.problem, "looked_at": looked_at}
    m = stages["distill"]["metrics"]
    return {**base, "looked_at": looked_at, "labels": m["labelled_train_images"] + m["val_images"],
            "test_acc": m["student_test_acc"], "teacher_test_acc": m["teacher_test_acc"],
            "adapt_val_acc": stages["adapt"]["metrics"].get("adapt_best_val_acc"),
            "wall_s": round(sum(s["wall_s"] for s in stages.values()), 1)}


def summarise(runs: list[dict]) -> list[dict]:
    """Per (row, N): the mean over subtasks of the seed means (student and teacher), labels used, failed runs."""
    out = []
    reference = {r["subtask"]: r["test_acc"] for r in runs if r["row"] == REFERENCE}
    for row in ROWS:
        for n in sorted({r["n"] for r in runs if r["row"] != REFERENCE}):
            mine = [r for r in runs if r["row"] == row and r["n"] == n]
            done = [r for r in mine if "error" not in r]
            if not mine:
                continue
            entry = {"row": row, "n": n, "runs": len(mine), "failed": len(mine) - len(done)}
            if done:
                entry.update({key: _subtask_mean(done, key) for key in ("test_acc", "teacher_test_acc")})
                entry["labels_mean"] = statistics.mean(r["labels"] for r in done)
                entry["per_subtask"] = {s: _spread([r["test_acc"] for r in done if r["subtask"] == s])
                                        for s in dict.fromkeys(r["subtask"] for r in done)}
                if reference and set(entry["per_subtask"]) <= set(reference):
                    entry["gap_to_every_label"] = statistics.mean(reference[s] - v["mean"]
                                                                  for s, v in entry["per_subtask"].items())
            out.append(entry)
    if reference:
        out.append({"row": REFERENCE, "n": "all", "runs": len(reference), "failed": 0,
                    "test_acc": statistics.mean(reference.values()),
                    "teacher_test_acc": statistics.mean(r["teacher_test_acc"] for r in runs if r["row"] == REFERENCE),
                    "labels_mean": statistics.mean(r["labels"] for r in runs if r["row"] == REFERENCE),
                    "per_subtask": {s: {"mean": v, "sd": 0.0, "seeds": 1} for s, v in reference.items()}})
    return out


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "seeds": len(values)}


def _subtask_mean(runs: list[dict], key: str) -> float:
    per = {}
    for r in runs:
        per.setdefault(r["subtask"], []).append(r[key])
    return statistics.mean(statistics.mean(v) for v in per.values())


def table(summary: list[dict]) -> str:
    subtasks = list(dict.fromkeys(s for r in summary for s in r.get("per_subtask", {})))
    head = (f"{'row':<20} {'N':>4}  {'student %':>9}  {'teacher %':>9}  {'gap':>5}  "
            + "".join(f"{s[:22]:>24}" for s in subtasks) + f"  {'labels':>7}  {'failed':>6}")
    lines = [head, "-" * len(head)]
    for r in summary:
        labels = f"{r['labels_mean']:>7.1f}" if "labels_mean" in r else f"{'-':>7}"
        gap = f"{r['gap_to_every_label'] * 100:>5.1f}" if "gap_to_every_label" in r else f"{'-':>5}"
        cells = "".join(_cell(r.get("per_subtask", {}).get(s)) for s in subtasks)
        lines.append(f"{r['row']:<20} {r['n']:>4}  {_pct(r, 'test_acc')}  {_pct(r, 'teacher_test_acc')}  {gap}  "
                     f"{cells}  {labels}  {r['failed']:>3}/{r['runs']:<2}")
    return "\n".join(lines)


def _cell(entry: dict | None) -> str:
    if entry is None:
        return f"{'-':>24}"
    return f"{entry['mean'] * 100:>16.2f} +- {entry['sd'] * 100:>4.2f}"


def _pct(entry: dict, key: str) -> str:
    return f"{entry[key] * 100:>9.2f}" if key in entry else f"{'-':>9}"


def plot(summary: list[dict], path: Path, stamp: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ns = sorted({r["n"] for r in summary if r["row"] != REFERENCE})
    width = 0.8 / len(ROWS)
    for k, row in enumerate(ROWS):
        values = [next((r.get("test_acc", np.nan) * 100 for r in summary if r["row"] == row and r["n"] == n), np.nan)
                  for n in ns]
        ax.bar(np.arange(len(ns)) + k * width, values, width, label=row)
    for r in summary:
        if r["row"] == REFERENCE:
            ax.axhline(r["test_acc"] * 100, color="black", linestyle="--", linewidth=1, label="every label")
    ax.set_xticks(np.arange(len(ns)) + width * (len(ROWS) - 1) / 2, [f"N = {n}" for n in ns])
    ax.set_ylabel("student test accuracy, mean over subtasks (%)")
    ax.set_title("Random vs suggested labels")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    save_figure(fig, path, stamp)
    plt.close(fig)


def _run_key(run: dict) -> tuple:
    return run["row"], run["subtask"], str(run["n"]), run["seed"]


def kept_runs(args) -> tuple[dict, list[dict]]:
    """With --keep-runs, the runs of the file at --out by (row, subtask, N, seed), and the stamps of the runs that
    made them (its own and those it kept, oldest first)."""
    if not (args.keep_runs and args.out.exists()):
        return {}, []
    earlier, now = json.loads(args.out.read_text()), settings(args)
    # files written before the parsed recipe's digest was recorded: the file's bytes and the --set overrides
    same = ("recipe_digest", "pool_cap") if "recipe_digest" in earlier["args"] else \
        ("recipe_sha256", "recipe_overrides", "pool_cap")
    differ = [k for k in same if earlier["args"].get(k) != now[k]]
    if differ:          # a run of another recipe would be mixed into this one's table
        raise SystemExit(f"--keep-runs: the runs in {args.out} were made with another recipe ({', '.join(differ)} "
                         "differ: the config file, --set or --pool-cap). Write to a new --out, or leave out "
                         "--keep-runs to build every run again.")
    return {_run_key(r): r for r in earlier["runs"]}, [*earlier.get("kept_from", []), earlier["provenance"]]


def main(argv=None) -> dict:
    args = parse_args(argv)
    start, runs = time.perf_counter(), []
    kept, kept_from = kept_runs(args)
    subtasks = SUBTASKS[:args.subtasks]

    def add(key: tuple, build, *build_args) -> None:
        runs.append(kept[key] if key in kept else build(*build_args))
        print(f"[{time.perf_counter() - start:6.0f} s] {' '.join(map(str, key))}: "
              f"{runs[-1].get('test_acc', runs[-1].get('error'))}{' (kept)' if key in kept else ''}", flush=True)

    for classes in subtasks if args.reference else []:
        add((REFERENCE, _subtask_label(classes), "all", 0), reference_row, args, classes)
    for seed in range(args.seeds):          # seeds outermost: an interrupted run has every subtask at some seeds
        for classes in subtasks:
            for n in args.labels:
                for row in args.rows:
                    add((row, _subtask_label(classes), str(n), seed), run_row, args, row, classes, n, seed)
    summary = summarise(runs)
    text = table(summary)
    print(text)
    result = {"args": settings(args), "wall_s": round(time.perf_counter() - start, 1), "summary": summary, "runs": runs,
              **({"kept_from": kept_from} if kept_from and any(_run_key(r) in kept for r in runs) else {})}
    stamp = write_results(args.out, result, args.command, table=text)
    plot(summary, args.out.with_suffix(".png"), stamp)
    return result


if __name__ == "__main__":
    main()
