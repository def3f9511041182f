"""Which score tells inputs outside the subtask apart best, with and without outlier exposure?

Teacher: the adapted EfficientNet-Lite0 of configs/fashion_tops.yaml (the pipeline's adapt stage; pass a built
adapt folder with --adapt to reuse it). Student: cnn_small distilled with KD (T = 4) as in the default config,
with the teacher's logits computed once for every training image and shared by all runs. For each subtask and
seed, three students: no outlier exposure, outlier exposure to the uniform distribution, outlier exposure to the
teacher's renormalised subtask probabilities (pipeline.ood.exposure, the same code the distill stage runs).
Each student is scored with msp, energy (T = 1 and T = 4), max_logit and a class-conditional Mahalanobis
distance on its penultimate features. The threshold is calibrated on the in-subtask VALIDATION images to keep
95 %; the out-of-subtask inputs are the TEST images of the dataset's other classes (never trained or calibrated
on); outlier exposure draws from the other classes' TRAINING images only. The default config's `ood:` section
is this benchmark's choice.

    python -m bench ood --adapt builds/fashion_tops/adapt-<key> --train-per-class 800 --test-per-class 400 \
        --epochs 6 --seeds 2                          # the committed results, about 15 min on 2 cores
    python -m bench ood --quick --adapt builds/fashion_tops/adapt-<key>       # tiny data, 1 epoch
Prints a table and writes bench/results/ood.json. The committed results are small: 800 training images per class
loaded, i.e. 640 train / 160 validation per class, 400 test images per class, 6 epochs, 2 seeds.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench._common import DEFAULT_CONFIG, parse, parser, quiet_progress, settings, write_results
from device_tests.ood import Rule, auroc, calibrate, evaluate, fpr_at_tpr, score
from pipeline.config import config_with
from pipeline.data import View, load_dataset
from pipeline.data.for_config import subtask_data
from pipeline.data.subtask import full_split
from pipeline.data.views import as_tensor
from pipeline.distill.methods import METHODS
from pipeline.distill.train import DistillSettings, Models, distill
from pipeline.models import create_model, load_teacher
from pipeline.models.adapt import teacher_class_ids
from pipeline.models.predict import predict_logits
from pipeline.ood.config import OODConfig
from pipeline.ood.data import outside_data
from pipeline.ood.exposure import OutlierExposure
from pipeline.ood.features import Mahalanobis, penultimate
from pipeline.runner import Build

SUBTASKS = {
    "tops": ["T-shirt/top", "Pullover", "Coat", "Shirt"],          # the default config's subtask
    "footwear": ["Sandal", "Sneaker", "Ankle boot"],
    "mixed": ["T-shirt/top", "Dress", "Shirt", "Bag"],
}
VARIANTS = {"none": None, "oe_uniform": "uniform", "oe_teacher": "teacher"}
SCORES = [("msp", 1.0), ("energy", 1.0), ("energy", 4.0), ("max_logit", 1.0), ("mahalanobis", None)]
QUIET = quiet_progress()
CPU = torch.device("cpu")


def parse_args(argv=None):
    p = parser("ood", __doc__)
    p.add_argument("--adapt", type=Path, default=None, help="a built adapt/ folder of the default config (else built)")
    p.add_argument("--subtasks", nargs="+", default=["tops", "footwear"], choices=list(SUBTASKS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--train-per-class", type=int, default=1500, help="images per class loaded from the training "
                   "split (80 %% train / 20 %% validation); caps the student's data and the outlier pool alike")
    p.add_argument("--test-per-class", type=int, default=500, help="cap per class on the test split (0: all 1000)")
    p.add_argument("--oe-weight", type=float, default=0.5)
    p.add_argument("--oe-ratio", type=float, default=1.0)
    p.add_argument("--tpr", type=float, default=0.95)
    p.add_argument("--threads", type=int, default=2)
    args = parse(p, argv)
    if args.quick:      # 150 images per class, 1 epoch, 1 seed
        args.train_per_class, args.test_per_class, args.epochs, args.seeds = 150, 100, 1, 1
    return args


def log(msg: str) -> None:
    print(msg, flush=True)


def base_config(args):
    return config_with(DEFAULT_CONFIG, {"data.train_per_class": args.train_per_class,
                                        "data.test_per_class": args.test_per_class or None})


def adapted_teacher(args) -> tuple[Path, float]:
    if args.adapt:
        return args.adapt, 0.0
    start = time.perf_counter()
    summary = Build(config_with(DEFAULT_CONFIG)).run(QUIET, until="adapt")
    return Path(summary[-1]["dir"]), time.perf_counter() - start


class TeacherCache:
    """The teacher's logits (all its classes) for every image of every split, computed once for all subtasks."""

    def __init__(self, teacher, view: View, cfg):
        dataset = load_dataset(cfg.data)
        train, val = full_split(dataset, cfg.data.val_fraction, cfg.build.seed)
        self.splits = {"train": train, "val": val, "test": dataset.test}
        start = time.perf_counter()
        self.logits = {name: predict_logits(teacher, view, s.images, CPU) for name, s in self.splits.items()}
        self.seconds = time.perf_counter() - start
        self.images = sum(len(s) for s in self.splits.values())

    def of(self, class_ids, columns, split: str = "train") -> torch.Tensor:
        """Logits (subtask columns) of the `split` images of `class_ids`, in dataset order."""
        keep = torch.as_tensor(np.isin(self.splits[split].labels, list(class_ids)))
        return self.logits[split][keep][:, columns]


def run_student(models: Models, data, outside, teacher_cache: TeacherCache, variant: str, seed: int, args) -> dict:
    torch.manual_seed(seed)
    student = create_model("cnn_small", data.num_classes, 1)
    run_models = Models(models.teacher, student, models.teacher_view, models.student_view, models.teacher_ids)
    base = base_config(args).distill
    cfg = base.model_copy(update={"epochs": args.epochs})
    method = METHODS.get(cfg.method)(cfg, pairs=[], teacher=models.teacher, student=student)
    precomputed = (teacher_cache.of(data.class_ids, models.teacher_ids), {})
    outliers = None
    if VARIANTS[variant] is not None:
        ood_cfg = OODConfig(outlier_exposure=True, oe_target=VARIANTS[variant], oe_weight=args.oe_weight,
                            oe_ratio=args.oe_ratio)
        teacher_logits = teacher_cache.of(outside.class_ids, models.teacher_ids) if VARIANTS[variant] == "teacher" else None
        outliers = OutlierExposure(as_tensor(outside.train.images), models.student_view, ood_cfg, cfg.batch_size,
                                   seed, CPU, teacher_logits, cfg.temperature)
    start = time.perf_counter()
    settings = DistillSettings(cfg, seed, CPU, QUIET, precomputed=precomputed, outliers=outliers)
    result = distill(run_models, method, data.train, data.val, settings)
    train_s = time.perf_counter() - start
    return {"subtask_classes": data.class_names, "variant": variant, "seed": seed, "best_epoch": result["best_epoch"],
            "val_acc": result["best_val_acc"], "train_s": train_s, "scores": score_student(student, models.student_view,
                                                                                          data, outside, args.tpr)}


def score_student(student, view, data, outside, tpr: float) -> dict:
    feats = {name: penultimate(student, view, images) for name, images in
             (("train", data.train.images), ("val", data.val.images), ("test", data.test.images),
              ("out", outside.test.images))}
    maha = Mahalanobis(feats["train"][0], data.train.labels)
    out = {}
    for kind, t in SCORES:
        name = kind if t is None or (kind == "max_logit") else f"{kind}_T{t:g}"
        if kind == "mahalanobis":
            s_val, s_in, s_out = (maha.score(feats[k][0]) for k in ("val", "test", "out"))
        else:
            s_val, s_in, s_out = (score(feats[k][1], kind, t) for k in ("val", "test", "out"))
        threshold = calibrate(s_val, tpr)
        correct = feats["test"][1].argmax(1) == data.test.labels
        accepted = s_in >= threshold
        out[name] = {"auroc": auroc(s_in, s_out), "fpr95": fpr_at_tpr(s_in, s_out, 0.95), "threshold": threshold,
                     "tpr_at_threshold": float(accepted.mean()), "fpr_at_threshold": float((s_out >= threshold).mean()),
                     "accuracy_all": float(correct.mean()), "accuracy_accepted": float(correct[accepted].mean())}
    return out


def teacher_reference(models: Models, data, outside, cache: TeacherCache, tpr: float) -> dict:
    """The teacher's own subtask logits under the same scores (what the student could at best inherit)."""
    val = cache.of(data.class_ids, models.teacher_ids, "val").numpy()
    test = cache.of(data.class_ids, models.teacher_ids, "test").numpy()
    out = cache.of(outside.class_ids, models.teacher_ids, "test").numpy()
    res = {}
    for kind, t in SCORES:
        if kind == "mahalanobis":
            continue
        rule = Rule(kind, t, calibrate(score(val, kind, t), tpr), tpr)
        m = evaluate(test, data.test.labels, out, rule, with_histogram=False)
        res[kind if kind == "max_logit" else f"{kind}_T{t:g}"] = {k: m[k] for k in (
            "auroc", "fpr95", "tpr_at_threshold", "fpr_at_threshold", "accuracy_all", "accuracy_accepted")}
    return res


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    keys = sorted({(r["subtask"], r["variant"]) for r in runs}, key=lambda k: (list(SUBTASKS).index(k[0]),
                                                                                 list(VARIANTS).index(k[1])))
    for subtask, variant in keys:
        group = [r for r in runs if r["subtask"] == subtask and r["variant"] == variant]
        for name in group[0]["scores"]:
            row = {"subtask": subtask, "variant": variant, "score": name, "seeds": len(group)}
            for metric in ("auroc", "fpr95", "tpr_at_threshold", "fpr_at_threshold", "accuracy_all", "accuracy_accepted"):
                values = [r["scores"][name][metric] for r in group]
                row[metric] = statistics.fmean(values)
                row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            rows.append(row)
    return rows


def table(rows: list[dict], teacher: dict) -> str:
    header = (f"{'subtask':<9} {'exposure':<11} {'score':<12} {'AUROC':>13} {'FPR@95':>13} {'kept(val thr)':>13} "
              f"{'out accepted':>12} {'acc all':>8} {'acc kept':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['subtask']:<9} {r['variant']:<11} {r['score']:<12} "
                     f"{r['auroc']:.4f}±{r['auroc_std']:.4f} {r['fpr95']:.4f}±{r['fpr95_std']:.4f} "
                     f"{r['tpr_at_threshold']:>13.4f} {r['fpr_at_threshold']:>12.4f} {r['accuracy_all']:>8.4f} "
                     f"{r['accuracy_accepted']:>8.4f}")
    for subtask, scores in teacher.items():
        for name, m in scores.items():
            lines.append(f"{subtask:<9} {'(teacher)':<11} {name:<12} {m['auroc']:.4f}        {m['fpr95']:.4f}        "
                         f"{m['tpr_at_threshold']:>13.4f} {m['fpr_at_threshold']:>12.4f} {m['accuracy_all']:>8.4f} "
                         f"{m['accuracy_accepted']:>8.4f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    adapt_dir, adapt_s = adapted_teacher(args)
    teacher, spec = load_teacher(adapt_dir)
    teacher.eval()
    tview = spec.input
    base = base_config(args)
    cache = TeacherCache(teacher, tview, base)
    log(f"teacher logits for {cache.images} images in {cache.seconds:.0f} s ({adapt_dir})")
    runs, teacher_ref, info = [], {}, {}
    for name in args.subtasks:
        cfg = config_with(base, {"subtask": {"classes": SUBTASKS[name]}})
        data, outside = subtask_data(cfg), outside_data(cfg)
        models = Models(teacher, None, tview, View(28, 1, (0.5,), (0.5,)), teacher_class_ids(spec.class_names, data))
        teacher_ref[name] = teacher_reference(models, data, outside, cache, args.tpr)
        info[name] = {"classes": SUBTASKS[name], "outside_classes": list(outside.class_names), "train": len(data.train),
                      "val": len(data.val), "test_in": len(data.test), "test_out": len(outside.test),
                      "outlier_pool": len(outside.train)}
        log(f"{name}: {info[name]}")
        for variant in args.variants:
            for seed in range(args.seeds):
                run = {"subtask": name, **run_student(models, data, outside, cache, variant, seed, args)}
                best = max(run["scores"].items(), key=lambda kv: kv[1]["auroc"])
                log(f"  {name} {variant:<10} seed {seed}: val acc {run['val_acc']:.4f}  train {run['train_s']:.0f} s  "
                    f"best AUROC {best[0]} {best[1]['auroc']:.4f} (energy_T1 {run['scores']['energy_T1']['auroc']:.4f}, "
                    f"msp {run['scores']['msp_T1']['auroc']:.4f})")
                runs.append(run)
    rows = summarise(runs)
    text = table(rows, teacher_ref)
    print(text)
    report = {"settings": settings(args),
              "student": "cnn_small, KD T=4 (default config's distill section, epochs overridden)",
              "teacher": str(adapt_dir), "teacher_logits_s": cache.seconds, "adapt_s": adapt_s,
              "subtasks": info, "summary": rows, "teacher_reference": teacher_ref, "runs": runs, "table": text,
              "wall_s": time.perf_counter() - started}
    write_results(args.out, report, args.command)
    log(f"wrote {args.out} ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
