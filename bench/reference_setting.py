"""The fixed comparison setting (configs/reference_tops.yaml): how does each distillation method do?

A VGG-style CNN teacher (1.13 M parameters) trained from scratch on all ten Fashion-MNIST classes, a ~61k-parameter
student of the same kind, the four "tops", three post-ReLU layer pairs at equal resolution, AdamW lr 1e-3 without
weight decay, batch 64, 6 epochs, KD at T = 4 with no label term (student_only: cross-entropy), layer methods
KD + 100 x their layer loss, 80/20 train/val split with the best validation epoch kept, no augmentation, seed 1.
Every row is the real pipeline (`Build(...).run(until="distill")`): the teacher stage is built once and cached,
each method adds its own distill (and, for subdistill, subspaces) stage.

    python -m bench reference_setting                    # every method (1332 s on 2 cores, cold)
    python -m bench reference_setting --methods kd       # one row
    python -m bench reference_setting --quick            # 1 teacher epoch, 1 distill epoch, few images
Prints a table and writes bench/results/reference_setting.json (per method: student test accuracy, best epoch,
distill stage wall time and training img/s; the teacher's 10-class validation and 4-class test accuracy).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from bench._common import ROOT, parse, parser, quiet_progress, write_results
from pipeline.config import config_with
from pipeline.data.sources import load_dataset
from pipeline.models import load_teacher
from pipeline.models.predict import accuracy, predict_logits
from pipeline.runner import Build

CONFIG = ROOT / "configs" / "reference_tops.yaml"
METHODS = ["student_only", "kd", "subdistill", "fitnet", "attention", "vkd"]
QUICK = {"data.train_per_class": 100, "data.test_per_class": 50, "teacher.train.epochs": 1, "distill.epochs": 1,
         "subspaces.max_images": 64}


def parse_args(argv=None):
    p = parser("reference_setting", __doc__)
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--config", type=Path, default=CONFIG)
    p.add_argument("--output", type=Path, default=None, help="build folder root (default: the config's build.output)")
    return parse(p, argv)


def method_config(method: str, args):
    overrides = {"distill.method": method, **(QUICK if args.quick else {})}
    if args.output is not None:
        overrides["build.output"] = str(args.output)
    return config_with(args.config, overrides)


def run_method(cfg, method: str, progress) -> dict:
    started = time.perf_counter()
    summary = Build(cfg).run(progress, until="distill")
    stages = {s["stage"]: s for s in summary}
    distill, teacher = stages["distill"], stages["teacher"]
    m = distill["metrics"]
    row = {"method": method, "student_test_acc": m["student_test_acc"], "teacher_test_acc": m["teacher_test_acc"],
           "best_epoch": m.get("best_epoch"), "best_val_acc": m.get("best_val_acc"),
           "train_images_per_s": m.get("train_images_per_s"), "distill_wall_s": distill["wall_s"],
           "distill_cached": distill["cached"], "student_params": m["student_params"],
           "teacher_params": m["teacher_params"], "student_macs": m["student_macs"], "teacher_macs": m["teacher_macs"],
           "test_images": m["test_images"], "build_wall_s": time.perf_counter() - started,
           "teacher": {"wall_s": teacher["wall_s"], "cached": teacher["cached"], "dir": teacher["dir"],
                       **teacher["metrics"]}}
    if "subspaces" in stages:
        row["subspaces_wall_s"] = stages["subspaces"]["wall_s"]
    return row


def ten_class_test_accuracy(cfg, teacher_dir: str) -> float:
    """The from-scratch teacher on the dataset's whole test split (every class), as published settings report it."""
    teacher, spec = load_teacher(Path(teacher_dir))
    test = load_dataset(cfg.data).test
    return accuracy(predict_logits(teacher.eval(), spec.input, test.images, torch.device("cpu")), test.labels)


def print_table(report: dict) -> None:
    rows = report["rows"]
    teacher = rows[0]["teacher"]
    print(f"\nteacher {rows[0]['teacher_params'] / 1e6:.2f} M params, {rows[0]['teacher_macs'] / 1e6:.0f} M MACs: "
          f"10-class val {100 * teacher['train_best_val_acc']:.2f} % (epoch {teacher['train_best_epoch']}), "
          f"10-class test {100 * report['teacher_test_acc_all_classes']:.2f} %, tops test "
          f"{100 * rows[0]['teacher_test_acc']:.2f} %; trained in {teacher['wall_s']:.0f} s")
    print(f"student {rows[0]['student_params'] / 1e3:.1f} k params, {rows[0]['student_macs'] / 1e6:.1f} M MACs; "
          f"{rows[0]['test_images']} test images")
    print(f"{'method':<14}{'test %':>8}{'best ep':>9}{'val %':>8}{'distill s':>11}{'img/s':>8}")
    for r in rows:
        wall = r["distill_wall_s"] + r.get("subspaces_wall_s", 0.0)
        print(f"{r['method']:<14}{100 * r['student_test_acc']:>8.2f}{r['best_epoch'] or 0:>9}"
              f"{100 * (r['best_val_acc'] or 0):>8.2f}{wall:>11.0f}{r['train_images_per_s'] or 0:>8.0f}")


def main(argv=None) -> None:
    args = parse_args(argv)
    progress = quiet_progress()
    report = {"config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
              "quick": args.quick, "threads": torch.get_num_threads(), "rows": []}
    started = time.perf_counter()
    for method in args.methods:
        report["rows"].append(run_method(method_config(method, args), method, progress))
        r = report["rows"][-1]
        print(f"{method}: test {100 * r['student_test_acc']:.2f} %, distill {r['distill_wall_s']:.0f} s"
              f"{' (cached)' if r['distill_cached'] else ''}", flush=True)
    report["teacher_test_acc_all_classes"] = ten_class_test_accuracy(method_config(args.methods[0], args),
                                                                     report["rows"][0]["teacher"]["dir"])
    report["wall_s"] = time.perf_counter() - started
    print_table(report)
    write_results(args.out, report, args.command)
    print(f"\nwrote {args.out} ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
