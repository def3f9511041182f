"""Which distillation method gives the best student, on several Fashion-MNIST subtasks, seeds and two teachers?

Teachers: (1) the adapted ImageNet-pretrained EfficientNet-Lite0 of configs/fashion_tops.yaml (built with the
pipeline up to `adapt`, so a cached adaptation is reused), and (2) a small CNN trained from scratch on the 10
classes. For each teacher and subtask: one teacher pass over the training images (shared by every method and
seed), the relevant subspaces (timed), then every method x seed with the same student, epochs, batch size and
learning rate. Each layer method's lambda_layer is chosen from a grid on VALIDATION accuracy (first subtask,
first seed) before the runs that are reported; the test split is only used for the reported accuracies.

    python -m bench distill_methods --quick                  # tiny data, CNN teacher, about 1 min
    python -m bench distill_methods                          # every method x 3 subtasks x 3 seeds x 2 teachers
Prints a table (mean +- std of subtask test accuracy per method and teacher) and writes
bench/results/distill_methods.json (runs, lambda choice, timings, throughput).

The full run takes about 12 min on 2 idle cores as the stage timing, then one process per teacher (1 thread
each, in parallel), then a merge:
    A=builds/fashion_tops/adapt-<key>
    C="--subtasks 3 --seeds 3 --epochs 6 --train-per-class 600 --test-per-class 500 --threads 1"
    python -m bench distill_methods --teachers --efficientnet-adapt $A --out /tmp/timing.json
    python -m bench distill_methods --teachers efficientnet --efficientnet-adapt $A $C --no-stage-timing \
        --out /tmp/efficientnet.json &
    python -m bench distill_methods --teachers cnn $C --no-stage-timing --out /tmp/cnn.json
    python -m bench distill_methods --merge /tmp/timing.json /tmp/efficientnet.json /tmp/cnn.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench._common import DEFAULT_CONFIG, parse, parser, quiet_progress, settings, write_results
from pipeline.config import config_with
from pipeline.data import View
from pipeline.data.for_config import subtask_data
from pipeline.data.views import as_tensor, batches
from pipeline.distill.config import DistillConfig
from pipeline.distill.features import as_map, pool_to, prefix_tokens, tap_features
from pipeline.distill.methods import METHODS
from pipeline.distill.subspace import Subspace, accumulate, save_subspaces
from pipeline.distill.train import DistillSettings, Models, distill, layer_pairs, load_models
from pipeline.models import create_model, load_teacher
from pipeline.models.adapt import teacher_class_ids
from pipeline.models.predict import accuracy, predict_logits
from pipeline.runner import Build, run_stage

METHOD_ORDER = ["student_only", "kd", "subdistill", "fitnet", "attention", "vkd"]
SUBTASKS = [
    ["T-shirt/top", "Pullover", "Coat", "Shirt"],          # the default: the hard "tops"
    ["Sandal", "Sneaker", "Ankle boot"],                   # footwear
    ["T-shirt/top", "Dress", "Shirt", "Bag"],
    ["Trouser", "Pullover", "Dress", "Coat", "Sandal"],
    ["Pullover", "Coat", "Shirt"],
]
QUIET = quiet_progress()


def parse_args(argv=None):
    p = parser("distill_methods", __doc__)
    p.add_argument("--teachers", nargs="*", default=["efficientnet", "cnn"], choices=["efficientnet", "cnn"],
                   help="none given: only the stage timing")
    p.add_argument("--methods", nargs="+", default=METHOD_ORDER, choices=METHOD_ORDER)
    p.add_argument("--subtasks", type=int, default=3, help=f"how many of the {len(SUBTASKS)} subtasks")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=600, help="student training images per class (cap)")
    p.add_argument("--test-per-class", type=int, default=500)
    p.add_argument("--efficientnet-adapt", type=Path, default=None,
                   help="use this committed adapt/ folder of the default config instead of building it")
    p.add_argument("--subspace-images", type=int, default=1024, help="cap on images per subtask's subspace estimate")
    p.add_argument("--teacher-train-per-class", type=int, default=1500, help="CNN teacher: images per class")
    p.add_argument("--teacher-epochs", type=int, default=3, help="CNN teacher: epochs from scratch")
    p.add_argument("--lambda-grid", type=float, nargs="+", default=[0.1, 1.0, 10.0],
                   help="multipliers of each method's default lambda_layer tried on validation data")
    p.add_argument("--layers", default="auto",
                   help="layer pairs for every teacher given: auto, or teacher:student,teacher:student,...")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lr-step-epochs", type=int, default=5)
    p.add_argument("--stage-timing", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the real `subspaces` stage of the default config (full training split)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: with two processes on 2 cores, 2 threads each ran up to 10x slower)")
    p.add_argument("--stage-threads", type=int, default=2, help="torch threads for the subspaces stage timing")
    p.add_argument("--stability-images", type=int, default=1024,
                   help="subspace stability: two disjoint sets of this many images (0: skip)")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="only merge these JSON reports (e.g. one per teacher, run in parallel) into --out")
    args = parse(p, argv)
    if args.quick:      # tiny data, CNN teacher, 1 seed, 2 epochs
        args.teachers, args.subtasks, args.seeds, args.epochs = ["cnn"], 1, 1, 2
        args.train_per_class, args.test_per_class, args.teacher_train_per_class, args.teacher_epochs = 60, 50, 100, 1
        args.lambda_grid, args.stage_timing = [1.0], False
    return args


# -- teachers -----------------------------------------------------------------------------------------------------

def teacher_config(kind: str, args):
    """The default config, or for the CNN teacher one trained from scratch on the 10 classes."""
    if kind != "cnn":
        return config_with(DEFAULT_CONFIG)
    return config_with(DEFAULT_CONFIG, {
        "build.name": "bench_cnn_teacher", "data.train_per_class": args.teacher_train_per_class,
        "teacher": {"source": "train", "input": {"size": 28, "channels": 1},
                    "train": {"arch": "cnn_teacher", "epochs": args.teacher_epochs}}})


def adapted_teacher(kind: str, args, cfg=None) -> tuple[Path, object]:
    """The pipeline's own teacher and adapt stages (cached across runs of the benchmark and real builds), of
    `cfg` if given, else of teacher_config(kind); returns the adapt folder and the config."""
    cfg = cfg or teacher_config(kind, args)
    if kind == "efficientnet" and args.efficientnet_adapt:
        log(f"teacher {kind}: given {args.efficientnet_adapt}")
        return args.efficientnet_adapt, cfg
    start = time.perf_counter()
    summary = Build(cfg).run(QUIET, until="adapt")
    log(f"teacher {kind}: {'cached' if all(s['cached'] for s in summary) else 'built'} "
        f"in {time.perf_counter() - start:.0f} s ({summary[-1]['dir']})")
    return Path(summary[-1]["dir"]), cfg


def subspace_stability(cfg, adapt_dir: Path, images: int) -> list[dict]:
    """Estimate each layer's subspace on two DISJOINT sets of `images` training images of the default subtask;
    overlap = ||U1^T U2||_F^2 / k (1: the same subspace; a random pair of k-subspaces of R^d gives about k/d)."""
    data = subtask_data(cfg)
    models = load_models(cfg, adapt_dir, data)
    pairs = layer_pairs(cfg.distill.layers, models)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(1))
    source = as_tensor(data.train.images)
    halves = [source[order[i * images:(i + 1) * images].sort().values] for i in range(2)]
    estimates = []
    for half in halves:
        normalised = (models.teacher_view(half[idx]) for idx in batches(len(half), 128))
        moments = accumulate(models.teacher, normalised, pairs, models.teacher_ids, 20, cfg.build.seed)
        estimates.append([Subspace.from_moments(m, p.student_channels, "subdistill", 0) for m, p in zip(moments, pairs)])
    return [{"pair": f"{p.teacher}<-{p.student}", "k": p.student_channels, "d": p.teacher_channels,
             "overlap": float((a.basis.T @ b.basis).pow(2).sum() / p.student_channels),
             "random_overlap": p.student_channels / p.teacher_channels}
            for p, a, b in zip(pairs, *estimates)]


def subspaces_stage_seconds(adapt_dir: Path | None, threads: int, stability_images: int) -> dict:
    """The real `subspaces` stage's run() on the default config with method subdistill (its full subtask training
    split, the default image cap), on the default config's adapted teacher, with `threads` torch threads."""
    cfg = config_with(DEFAULT_CONFIG, {"distill.method": "subdistill", "distill.layers": "auto"})
    if adapt_dir is None:
        adapt_dir = Path(Build(cfg).run(QUIET, until="adapt")[-1]["dir"])
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            metrics = run_stage(cfg, "subspaces", Path(out), {"adapt": adapt_dir}, QUIET)
            wall = time.perf_counter() - start
            stability = subspace_stability(cfg, adapt_dir, stability_images) if stability_images else None
    finally:
        torch.set_num_threads(previous)
    return {"estimation_s": metrics["estimation_s"], "stage_wall_s": wall, "threads": threads,
            "images": metrics["images"], "pairs": metrics["pairs"], "layers": metrics["layers"],
            "stability": stability}


# -- one subtask ----------------------------------------------------------------------------------------------------

@dataclass
class Subtask:
    name: str
    data: object
    models: Models
    pairs: list
    precomputed: tuple
    subspaces_dir: Path
    teacher_test_acc: float
    subspace_s: float


def student_view() -> View:
    return View(28, 1, (0.5,), (0.5,))


def prepare_subtask(teacher, spec: dict, cfg, classes: list[str], args, workdir: Path) -> Subtask:
    data = subtask_data(config_with(cfg, {"subtask": {"classes": classes}, "data.train_per_class": args.train_per_class,
                                          "data.test_per_class": args.test_per_class}))
    tview = spec.input
    probe = create_model("cnn_small", len(classes), 1)
    models = Models(teacher, probe, tview, student_view(), teacher_class_ids(spec.class_names, data))
    pairs = layer_pairs(parse_layers(args.layers), models)
    images = as_tensor(data.train.images)
    precomputed = teacher_pass(models, pairs, images)
    test_logits = predict_logits(teacher, tview, data.test.images, torch.device("cpu"), columns=models.teacher_ids)
    start = time.perf_counter()
    chosen = images[:args.subspace_images]     # the subtask's training images are in dataset order, classes mixed
    normalised = (tview(chosen[idx]) for idx in batches(len(chosen), 128))
    moments = accumulate(teacher, normalised, pairs, models.teacher_ids, positions=20, seed=0)
    subspaces = [Subspace.from_moments(m, p.student_channels, "subdistill", i) for i, (m, p) in enumerate(zip(moments, pairs))]
    seconds = time.perf_counter() - start
    folder = workdir / "_".join(c.split("/")[0] for c in classes)
    folder.mkdir(parents=True, exist_ok=True)
    save_subspaces(folder, pairs, subspaces, {"basis": "subdistill"})
    return Subtask("/".join(c.split("/")[0] for c in classes), data, models, pairs, precomputed, folder,
                   accuracy(test_logits, data.test.labels), seconds)


def parse_layers(text: str):
    if text == "auto":
        return "auto"
    return DistillConfig(layers=[dict(zip(("teacher", "student"), pair.split(":"))) for pair in text.split(",")]).layers


@torch.no_grad()
def teacher_pass(models: Models, pairs, images: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Subtask logits and each pair's teacher map (pooled to where it is compared) for every training image."""
    teacher, logits, maps = models.teacher.eval(), [], {i: [] for i in range(len(pairs))}
    prefix = prefix_tokens(teacher)
    for idx in batches(len(images), 256):
        with tap_features(teacher, [p.teacher for p in pairs]) as feats:
            logits.append(teacher(models.teacher_view(images[idx]))[:, models.teacher_ids].float())
        for i, p in enumerate(pairs):
            maps[i].append(pool_to(as_map(feats[i], prefix), p.size).float())
    return torch.cat(logits), {i: torch.cat(m) for i, m in maps.items()}


def run_method(task: Subtask, method: str, seed: int, lambda_layer: float | None, args,
               keep: dict | None = None) -> dict:
    """One distillation run; `keep`, if given, receives the trained student (xai_spurious explains it)."""
    torch.manual_seed(seed)
    student = create_model("cnn_small", task.data.num_classes, 1)
    if keep is not None:
        keep["student"] = student
    models = Models(task.models.teacher, student, task.models.teacher_view, task.models.student_view,
                    task.models.teacher_ids)
    cfg = DistillConfig(method=method, lambda_layer=lambda_layer, epochs=args.epochs, batch_size=args.batch_size,
                        lr=args.lr, lr_step_epochs=args.lr_step_epochs, layers="auto")
    cls = METHODS.get(method)
    distiller = cls(cfg, pairs=task.pairs if cls.uses_layers else [], teacher=models.teacher, student=student,
                    subspaces_dir=task.subspaces_dir)
    settings = DistillSettings(cfg, seed, torch.device("cpu"), QUIET, precomputed=task.precomputed)
    result = distill(models, distiller, task.data.train, task.data.val, settings)
    test_acc = accuracy(predict_logits(student, models.student_view, task.data.test.images, torch.device("cpu")),
                        task.data.test.labels)
    last = result["history"][-1]
    return {"subtask": task.name, "method": method, "seed": seed, "lambda_layer": distiller.lambda_layer,
            "test_acc": test_acc, "val_acc": result["best_val_acc"], "best_epoch": result["best_epoch"],
            "train_images_per_s": result["train_images_per_s"],
            "final_losses": {k: v for k, v in last.items() if k not in ("epoch", "val_acc")}}


def choose_lambdas(task: Subtask, args) -> dict:
    """Per layer method: the lambda_layer (default x grid) with the best validation accuracy (seed 0)."""
    chosen, trials = {}, {}
    for method in args.methods:
        cls = METHODS.get(method)
        if not cls.uses_layers:
            continue
        grid = [cls.default_lambda * m for m in args.lambda_grid]
        results = [run_method(task, method, 0, lam, args) for lam in grid]
        trials[method] = [{"lambda_layer": r["lambda_layer"], "val_acc": r["val_acc"],
                           "final_losses": r["final_losses"]} for r in results]
        chosen[method] = max(results, key=lambda r: r["val_acc"])["lambda_layer"]
        log(f"  lambda {method}: " + ", ".join(f"{r['lambda_layer']:g} -> val {r['val_acc']:.4f}" for r in results)
            + f"  => {chosen[method]:g}")
    return {"chosen": chosen, "trials": trials}


# -- report -----------------------------------------------------------------------------------------------------

def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: list[dict], methods: list[str]) -> dict:
    out = {}
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        per_subtask = {}
        for name in dict.fromkeys(r["subtask"] for r in mine):
            per_subtask[name] = mean_std([r["test_acc"] for r in mine if r["subtask"] == name])
        # Average over subtasks of the per-subtask means; spread: std over seeds averaged over subtasks.
        out[method] = {"mean": statistics.fmean(m for m, _ in per_subtask.values()),
                       "seed_std": statistics.fmean(s for _, s in per_subtask.values()),
                       "per_subtask": per_subtask,
                       "images_per_s": statistics.fmean(r["train_images_per_s"] for r in mine)}
    return out


def print_table(report: dict, methods: list[str]) -> None:
    teachers = list(report["teachers"])
    if not teachers:
        return print_stage_timing(report)
    print("\nsubtask test accuracy, mean over subtasks of the mean over seeds (+- mean seed std); img/s = training")
    print(f"{'method':<14}" + "".join(f"{t:>30}" for t in teachers))
    for method in methods:
        cells = []
        for t in teachers:
            s = report["teachers"][t]["summary"][method]
            cells.append(f"{100 * s['mean']:6.2f} +- {100 * s['seed_std']:4.2f}  {s['images_per_s']:7.0f} img/s")
        print(f"{method:<14}" + "".join(f"{c:>30}" for c in cells))
    print(f"{'teacher':<14}" + "".join(f"{100 * statistics.fmean(report['teachers'][t]['teacher_test_acc'].values()):>13.2f}"
                                      + " " * 17 for t in teachers))
    for t in teachers:
        entry = report["teachers"][t]
        print(f"\n{t}: pairs {entry['pairs']}; lambda {entry['lambda']['chosen']}")
        print("  per subtask: " + "; ".join(
            f"{name} (teacher {100 * acc:.1f}): " + ", ".join(
                f"{m} {100 * entry['summary'][m]['per_subtask'][name][0]:.1f}" for m in methods)
            for name, acc in entry["teacher_test_acc"].items()))
        print("  subspace estimation: " + ", ".join(f"{n} {s:.1f} s" for n, s in entry["subspace_s"].items()))
        summary = entry["summary"]
        if "kd" in summary:
            print("  training throughput relative to kd: " + ", ".join(
                f"{m} {summary[m]['images_per_s'] / summary['kd']['images_per_s']:.2f}" for m in methods))
    print_stage_timing(report)


def print_stage_timing(report: dict) -> None:
    if "stage_timing" in report:
        st = report["stage_timing"]
        print(f"\nsubspaces stage, default config: {st['estimation_s']:.1f} s estimation "
              f"({st['images']} images, {st['threads']} threads, pairs {st['pairs']}), stage wall {st['stage_wall_s']:.1f} s")
        for row in st.get("stability") or []:
            print(f"  stability {row['pair']}: overlap of two disjoint-image estimates {row['overlap']:.3f} "
                  f"(random subspaces: {row['random_overlap']:.3f})")


def log(message: str) -> None:
    print(message, flush=True)


def merge(paths: list[Path], out: Path, command: str) -> None:
    """One report of several (e.g. one per teacher, run in parallel); the parts' stamps are kept in it."""
    reports = [json.loads(p.read_text()) for p in paths]
    merged = {**reports[0], "teachers": {}, "merged_from": {str(p): r.get("provenance") for p, r in zip(paths, reports)}}
    for report in reports:
        merged["teachers"].update(report["teachers"])
        merged.update({k: report[k] for k in ("stage_timing",) if k in report})
    merged["wall_s"] = max(r["wall_s"] for r in reports)
    methods = [m for m in METHOD_ORDER if all(m in t["summary"] for t in merged["teachers"].values())]
    print_table(merged, methods)
    write_results(out, merged, command)
    print(f"\nwrote {out}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out, args.command)
    torch.set_num_threads(args.threads)
    methods = [m for m in METHOD_ORDER if m in args.methods]
    report = {"args": settings(args), "threads": torch.get_num_threads(), "teachers": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.teachers:
            folder, cfg = adapted_teacher(kind, args)
            teacher, spec = load_teacher(folder)
            for p in teacher.parameters():
                p.requires_grad_(False)
            tasks = [prepare_subtask(teacher, spec, cfg, classes, args, Path(tmp) / kind)
                     for classes in SUBTASKS[:args.subtasks]]
            log(f"{kind}: pairs {[(p.teacher, p.student) for p in tasks[0].pairs]}; teacher test acc "
                + ", ".join(f"{t.name} {100 * t.teacher_test_acc:.1f}" for t in tasks))
            lambdas = choose_lambdas(tasks[0], args)
            runs = []
            for task in tasks:
                for method in methods:
                    for seed in range(args.seeds):
                        runs.append(run_method(task, method, seed, lambdas["chosen"].get(method), args))
                        r = runs[-1]
                        log(f"  {kind} {task.name} {method} seed {seed}: test {r['test_acc']:.4f} "
                            f"val {r['val_acc']:.4f} ({r['train_images_per_s']:.0f} img/s)")
            report["teachers"][kind] = {
                "pairs": [(p.teacher, p.student) for p in tasks[0].pairs], "lambda": lambdas,
                "teacher_test_acc": {t.name: t.teacher_test_acc for t in tasks},
                "subspace_s": {t.name: t.subspace_s for t in tasks},
                "train_images": {t.name: len(t.data.train) for t in tasks},
                "summary": summarise(runs, methods), "runs": runs}
    if args.stage_timing:
        report["stage_timing"] = subspaces_stage_seconds(args.efficientnet_adapt, args.stage_threads,
                                                         args.stability_images)
    report["wall_s"] = time.perf_counter() - started
    print_table(report, methods)
    write_results(args.out, report, args.command)
    print(f"\nwrote {args.out} ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
