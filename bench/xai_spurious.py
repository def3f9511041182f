"""Does the student decide like the teacher, and does it resist a planted shortcut?

(a) Heatmap agreement: SubDistill, KD and FitNet students (plus CE-only and an untrained student as references)
    distilled from the default config's adapted EfficientNet-Lite0 on the default subtask (clean data); LRP
    heatmaps of the logit gap for teacher (64x64 RGB) and student (28x28 gray) on the same test images, compared at
    28x28 (cosine and Spearman, mean over images, then mean +- std over seeds), and the students' pixel-flipping
    AUC (relevance order vs random order).
(b) Spurious correlation: the same methods with `data.spurious` at p in {0, .25, .5, .75, 1}: a digit glyph
    showing the class index on a fraction p of the training (and validation) images, a random digit on the same
    fraction of the test images. The teacher was adapted on clean images and is not retrained. Test accuracy, also
    split into marked / unmarked test images.

It reuses distill_methods: the pipeline's own adapt stage for the teacher (cached), one teacher pass per data
variant shared by every method and seed, the lambda_layer each layer method got on validation data there
(bench/results/distill_methods.json, efficientnet teacher), and the same training loop.

    python -m bench xai_spurious --quick              # tiny data, about 2 min
    python -m bench xai_spurious --adapt-max-images 6000 --train-per-class 400 --test-per-class 300 --epochs 5 \
        --explain-images 64                           # the committed results, about 9 min on 2 cores
The committed results are small on purpose: 400 training images per class (80 % train / 20 % val), 300 test images
per class, 5 epochs, cnn_small student, 2 seeds, 64 explained test images, and the default config's teacher adapted
on 6000 (instead of all 48000) training images (--adapt-max-images; without it the default config's own adapt stage
is used, as in distill_methods). Prints two tables and writes bench/results/xai_spurious.json and .png (plus
xai_spurious_grid.png: example heatmaps, seed 0, with each student's cosine to the teacher).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench import distill_methods as dm
from bench._common import DEFAULT_CONFIG, RESULTS, parse, parser, save_figure, settings, write_results
from pipeline.config import SpuriousConfig, config_with
from pipeline.data.for_config import subtask_data
from pipeline.data.spurious import add_markers
from pipeline.models import create_model, load_teacher
from pipeline.models.predict import accuracy, predict_logits
from pipeline.xai.config import ExplainConfig
from pipeline.xai.explain import explain_pair

METHODS = ["student_only", "kd", "subdistill", "fitnet"]
FRACTIONS = [0.0, 0.25, 0.5, 0.75, 1.0]
CPU = torch.device("cpu")


def parse_args(argv=None):
    p = parser("xai_spurious", __doc__)
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--fractions", type=float, nargs="+", default=FRACTIONS)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--train-per-class", type=int, default=600)
    p.add_argument("--test-per-class", type=int, default=500)
    p.add_argument("--explain-images", type=int, default=128)
    p.add_argument("--adapt", type=Path, default=None, help="a committed adapt/ folder of the default config")
    p.add_argument("--adapt-max-images", type=int, default=None,
                   help="build the default config's adapt stage with teacher.adapt.max_images capped (cheaper)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip", choices=["agreement", "spurious"], default=None, help="run only the other part")
    args = parse(p, argv)
    if args.quick:      # tiny data, 1 seed, 2 epochs, p in {0, 1}
        args.seeds, args.epochs, args.train_per_class, args.test_per_class = 1, 2, 100, 50
        args.fractions, args.explain_images = [0.0, 1.0], 16
    return args


def dm_args(args):
    """The distill_methods settings the shared helpers read (same student, optimiser, schedule)."""
    return dm.parse_args(["--epochs", str(args.epochs), "--train-per-class", str(args.train_per_class),
                          "--test-per-class", str(args.test_per_class), "--threads", str(args.threads)])


def chosen_lambdas() -> dict:
    """lambda_layer per layer method as chosen on validation data by distill_methods (efficientnet teacher)."""
    path = RESULTS / "distill_methods.json"
    if path.is_file():
        return json.loads(path.read_text())["teachers"]["efficientnet"]["lambda"]["chosen"]
    return {}


def adapted_teacher(args, shared) -> tuple[Path, object]:
    """distill_methods' default-config teacher, optionally with a cap on the adaptation images."""
    capped = args.adapt_max_images and not args.adapt
    cfg = config_with(DEFAULT_CONFIG, {"teacher.adapt.max_images": args.adapt_max_images}) if capped else None
    return dm.adapted_teacher("efficientnet", shared, cfg)


def log(message: str) -> None:
    print(message, flush=True)


# -- (a) heatmap agreement -------------------------------------------------------------------------------------------

def agreement_part(teacher, spec, cfg, args, shared, lambdas, workdir) -> dict:
    task = dm.prepare_subtask(teacher, spec, cfg, dm.SUBTASKS[0], shared, workdir / "clean")
    cfg = ExplainConfig(images=args.explain_images, size=28, batch_size=32)
    cache: dict = {}
    test = task.data.test
    runs, grids = [], {}
    for method in ["untrained", *args.methods]:
        for seed in range(args.seeds if method != "untrained" else 1):
            keep: dict = {}
            if method == "untrained":
                torch.manual_seed(seed)
                keep["student"] = create_model("cnn_small", task.data.num_classes, 1).eval()
                acc = accuracy(predict_logits(keep["student"], task.models.student_view, test.images, CPU), test.labels)
            else:
                acc = dm.run_method(task, method, seed, lambdas.get(method), shared, keep=keep)["test_acc"]
            start = time.perf_counter()
            result = explain_pair(teacher, task.models.teacher_view, task.models.teacher_ids, keep["student"],
                                  task.models.student_view, test.images, test.labels, cfg, seed=0, teacher_cache=cache)
            m = result.metrics
            if seed == 0:
                grids[method] = result.arrays()
            runs.append({"method": method, "seed": seed, "test_acc": acc, "cosine": m["cosine_mean"],
                         "spearman": m["spearman_mean"], "flip_auc": m["student_pixel_flipping"]["auc"],
                         "flip_auc_gain": m["student_pixel_flipping"]["auc_gain"],
                         "student_conservation": m["student"]["conservation"], "explain_s": time.perf_counter() - start})
            log(f"  (a) {method} seed {seed}: test {acc:.4f} cosine {m['cosine_mean']:.3f} "
                f"spearman {m['spearman_mean']:.3f} flip AUC gain {m['student_pixel_flipping']['auc_gain']:.3f}")
    return {"grids": (grids, task.data.class_names),       # drawn once the results are stamped
            "subtask": task.name, "teacher_test_acc": task.teacher_test_acc, "explain_images": args.explain_images,
            "teacher": {k: v for k, v in m["teacher"].items()}, "student_rules": m["student"]["rules"],
            "runs": runs, "summary": summarise(runs, ["cosine", "spearman", "flip_auc_gain", "test_acc"])}


# -- (b) spurious correlation ----------------------------------------------------------------------------------------

def spurious_part(teacher, spec, cfg, args, shared, lambdas, workdir) -> dict:
    runs, teacher_acc = [], {}
    for p in args.fractions:
        variant = config_with(cfg, {"data.spurious": {"fraction": p}})
        task = dm.prepare_subtask(teacher, spec, variant, dm.SUBTASKS[0], shared, workdir / f"p{p}")
        teacher_acc[p] = task.teacher_test_acc
        marked = test_markers(cfg, shared, p)
        for method in args.methods:
            for seed in range(args.seeds):
                keep: dict = {}
                r = dm.run_method(task, method, seed, lambdas.get(method), shared, keep=keep)
                pred = predict_logits(keep["student"], task.models.student_view, task.data.test.images, CPU).argmax(1)
                hit = (pred == torch.as_tensor(task.data.test.labels)).numpy()
                unmarked = np.setdiff1d(np.arange(len(hit)), marked)
                runs.append({"fraction": p, "method": method, "seed": seed, "test_acc": r["test_acc"],
                             "val_acc": r["val_acc"], "marked_acc": _mean(hit[marked]),
                             "unmarked_acc": _mean(hit[unmarked])})
                log(f"  (b) p={p:g} {method} seed {seed}: test {r['test_acc']:.4f} (val {r['val_acc']:.4f}, "
                    f"marked {runs[-1]['marked_acc']:.4f}, unmarked {runs[-1]['unmarked_acc']:.4f})")
    summary = {method: {str(p): mean_std([r["test_acc"] for r in runs if r["method"] == method and r["fraction"] == p])
                        for p in args.fractions} for method in args.methods}
    return {"subtask": "/".join(c.split("/")[0] for c in dm.SUBTASKS[0]), "teacher_test_acc": teacher_acc,
            "runs": runs, "summary": summary}


def test_markers(cfg, shared, p: float) -> np.ndarray:
    """Indices of the marked test images (the same draw the pipeline made), given the clean config."""
    clean = config_with(cfg, {"data.spurious": None, "data.train_per_class": shared.train_per_class,
                              "data.test_per_class": shared.test_per_class})
    _, markers = add_markers(subtask_data(clean), SpuriousConfig(fraction=p), clean.build.seed)
    return markers["test"].index


# -- report ----------------------------------------------------------------------------------------------------------

def _mean(x) -> float:
    return float(np.mean(x)) if len(x) else float("nan")


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: list[dict], keys: list[str]) -> dict:
    methods = list(dict.fromkeys(r["method"] for r in runs))
    return {m: {k: mean_std([r[k] for r in runs if r["method"] == m]) for k in keys} for m in methods}


def print_tables(report: dict) -> None:
    if "agreement" in report:
        a = report["agreement"]
        print(f"\n(a) heatmap agreement with the teacher, subtask {a['subtask']} (teacher test acc "
              f"{100 * a['teacher_test_acc']:.1f} %), {a['explain_images']} test images, mean +- std over seeds")
        print(f"{'method':<14}{'cosine':>16}{'Spearman':>16}{'flip AUC gain':>16}{'student test acc':>18}")
        for method, s in a["summary"].items():
            print(f"{method:<14}" + "".join(f"{s[k][0]:>9.3f} +- {s[k][1]:.3f}" for k in ("cosine", "spearman", "flip_auc_gain"))
                  + f"{100 * s['test_acc'][0]:>10.2f} +- {100 * s['test_acc'][1]:.2f}")
        print(f"teacher: {a['teacher']['rules']}\nstudent: {a['student_rules']}")
    if "spurious" in report:
        b = report["spurious"]
        fractions = list(b["teacher_test_acc"])
        print(f"\n(b) test accuracy (%) with a class-index marker on a fraction p of the training images "
              f"(random on test), subtask {b['subtask']}, mean +- std over seeds")
        print(f"{'method':<14}" + "".join(f"{'p=' + format(float(p), 'g'):>16}" for p in fractions))
        for method, row in b["summary"].items():
            print(f"{method:<14}" + "".join(f"{100 * row[str(p)][0]:>9.2f} +- {100 * row[str(p)][1]:4.2f}" for p in fractions))
        print(f"{'teacher':<14}" + "".join(f"{100 * b['teacher_test_acc'][p]:>16.2f}" for p in fractions))


def grid_figure(grids: dict, class_names: list[str], path: Path, stamp: dict, rows: int = 5) -> None:
    """A look at the heatmaps (seed 0): image | teacher | each student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(grids.values()))
    columns = [("image", None), ("teacher", first["teacher_maps"])] + [(m, g["student_maps"]) for m, g in grids.items()]
    fig, axes = plt.subplots(rows, len(columns), figsize=(1.5 * len(columns), 1.6 * rows), squeeze=False)
    for i in range(rows):
        for j, (name, maps) in enumerate(columns):
            ax = axes[i, j]
            if maps is None:
                ax.imshow(first["images_u8"][i, 0], cmap="gray", vmin=0, vmax=255)
                title = class_names[int(first["labels"][i])]
            else:
                limit = float(np.abs(maps[i]).max()) or 1.0
                ax.imshow(maps[i], cmap="bwr", vmin=-limit, vmax=limit)
                title = name if name == "teacher" else f"{name} {grids[name]['cosine'][i]:.2f}"
            ax.set_title(title if i == 0 or maps is None else title.split(" ")[-1], fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path, stamp, dpi=100)
    plt.close(fig)


def plot(report: dict, path: Path, stamp: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if "agreement" in report:
        s = report["agreement"]["summary"]
        methods = list(s)
        x = np.arange(len(methods))
        for offset, key in ((-0.2, "cosine"), (0.2, "spearman")):
            left.bar(x + offset, [s[m][key][0] for m in methods], 0.4, yerr=[s[m][key][1] for m in methods],
                     capsize=3, label=key)
        left.set_xticks(x, methods)
        left.axhline(0, color="#999", linewidth=0.8)
        left.set_title(f"(a) teacher-student heatmap agreement\n(LRP of the logit gap, "
                       f"{report['agreement']['explain_images']} test images)", fontsize=10)
        left.legend(fontsize=8)
    if "spurious" in report:
        b = report["spurious"]
        fractions = [float(p) for p in b["teacher_test_acc"]]
        for method, row in b["summary"].items():
            means = [100 * row[str(p)][0] for p in b["teacher_test_acc"]]
            stds = [100 * row[str(p)][1] for p in b["teacher_test_acc"]]
            right.errorbar(fractions, means, yerr=stds, marker="o", capsize=3, label=method)
        right.plot(fractions, [100 * v for v in b["teacher_test_acc"].values()], "k--", label="teacher (clean-trained)")
        right.axhline(100 / len(dm.SUBTASKS[0]), color="#999", linewidth=0.8, linestyle=":", label="chance")
        right.set_xlabel("fraction p of training images with the class-index marker")
        right.set_ylabel("test accuracy (%), random markers on test")
        right.set_title(f"(b) spurious-correlation stress test ({b['subtask']})", fontsize=10)
        right.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, stamp)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    shared = dm_args(args)
    shared.efficientnet_adapt = args.adapt
    started = time.perf_counter()
    folder, cfg = adapted_teacher(args, shared)
    teacher, spec = load_teacher(folder)
    for p in teacher.parameters():
        p.requires_grad_(False)
    lambdas = chosen_lambdas()
    log(f"teacher {folder}; lambda_layer {lambdas}")
    report = {"args": settings(args), "lambda_layer": lambdas, "adapt": str(folder),
              "threads": torch.get_num_threads()}
    grids = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.skip != "agreement":
            report["agreement"] = agreement_part(teacher, spec, cfg, args, shared, lambdas, Path(tmp))
            grids = report["agreement"].pop("grids")
        if args.skip != "spurious":
            report["spurious"] = spurious_part(teacher, spec, cfg, args, shared, lambdas, Path(tmp))
    report["wall_s"] = time.perf_counter() - started
    print_tables(report)
    stamp = write_results(args.out, report, args.command)
    plot(report, args.out.with_suffix(".png"), stamp)
    if grids is not None:
        grid_figure(*grids, args.out.with_name(args.out.stem + "_grid.png"), stamp)
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')} ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
