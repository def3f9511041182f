"""Benchmark: one build in 1 process and in N processes (torchrun via `edgesmith build --nproc N`, gloo on the CPU).

Builds a Fashion-MNIST tops SubDistill (+ QAT) config once in one process, then rebuilds the distributed stages
(subspaces, distill, qat) in N processes into the same cache (same keys), and compares the stage wall times
(stage.json, rank 0), the subspace bases (largest |difference| up to sign), and the accuracies.

    .venv/bin/python bench/distributed.py --nproc 2 --train-per-class 1000 --epochs 3
Prints a table and writes bench/results/distributed.json. On the 2-core build machine 2 processes cannot be
faster than one process using both cores: the point there is that it works and what it costs; on GPUs each process
has its own device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "distributed.json"
STAGES = ("subspaces", "distill", "qat")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--train-per-class", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=3, help="distill epochs")
    p.add_argument("--threads", type=int, default=1, help="build.threads of every process")
    p.add_argument("--student", default="cnn_small")
    return p.parse_args(argv)


def config(output: Path, args) -> dict:
    return {
        "build": {"name": "bench", "seed": 0, "output": str(output), "threads": args.threads},
        "data": {"dataset": "fashion_mnist", "train_per_class": args.train_per_class, "test_per_class": 500},
        "subtask": {"classes": ["T-shirt/top", "Pullover", "Coat", "Shirt"]},
        "teacher": {"source": "train", "train": {"arch": "cnn_small", "epochs": 2, "lr": 0.01, "batch_size": 64}},
        "student": {"arch": args.student},
        "subspaces": {"batch_size": 64},
        "distill": {"method": "subdistill", "epochs": args.epochs, "batch_size": 64, "lr": 0.003},
        "qat": {"epochs": 1, "batch_size": 64},
    }


def build(cfg_path: Path, *extra: str) -> float:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "build", str(cfg_path), *extra], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    if result.returncode:
        sys.exit(result.stdout + result.stderr)
    return time.perf_counter() - start


def stages(root: Path) -> dict:
    out = {}
    for stage in STAGES:
        folder = next(p for p in root.glob(f"{stage}-*") if (p / "stage.json").is_file())
        out[stage] = {"dir": folder.name, **json.loads((folder / "stage.json").read_text())}
    out["subspaces"]["tensors"] = torch.load(next(root.glob("subspaces-*")) / "subspaces.pt", weights_only=True)
    return out


def basis_difference(a: dict, b: dict) -> float:
    worst = 0.0
    for key in a:
        if key.endswith(".basis"):
            x, y = a[key].double(), b[key].double()
            worst = max(worst, float((x - y * torch.sign((x * y).sum(0))).abs().max()))
    return worst


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.yaml"
        path.write_text(yaml.safe_dump(config(Path(tmp) / "builds", args)))
        root = Path(tmp) / "builds" / "bench"
        build(path, "--until", "adapt")                      # the teacher is shared by both runs
        one_s = build(path)
        one = stages(root)
        two_s = build(path, "--nproc", str(args.nproc), *[a for s in STAGES for a in ("--force", s)])
        two = stages(root)
    rows = {s: {"wall_s_1": one[s]["wall_time_s"], f"wall_s_{args.nproc}": two[s]["wall_time_s"],
                "same_key": one[s]["dir"] == two[s]["dir"]} for s in STAGES}
    d1, d2 = one["distill"]["metrics"], two["distill"]["metrics"]
    q1, q2 = one["qat"]["metrics"], two["qat"]["metrics"]
    result = {
        "settings": vars(args), "host": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "stages": rows, "build_wall_s": {"1": round(one_s, 1), str(args.nproc): round(two_s, 1)},
        "basis_max_abs_diff": basis_difference(one["subspaces"]["tensors"], two["subspaces"]["tensors"]),
        "student_test_acc": {"1": d1["student_test_acc"], str(args.nproc): d2["student_test_acc"]},
        "train_images_per_s": {"1": d1["train_images_per_s"], str(args.nproc): d2["train_images_per_s"]},
        "int8_test_acc": {"1": q1["int8_test_acc"], str(args.nproc): q2["int8_test_acc"]},
        "test_images": d1["test_images"],
    }
    print(f"{'stage':<10} {'1 proc (s)':>11} {f'{args.nproc} procs (s)':>12}  same key")
    for s, r in rows.items():
        print(f"{s:<10} {r['wall_s_1']:>11.1f} {r[f'wall_s_{args.nproc}']:>12.1f}  {r['same_key']}")
    print(f"build (process wall time, distributed stages rebuilt): {one_s:.1f} s vs {two_s:.1f} s")
    print(f"basis max |diff| (up to sign): {result['basis_max_abs_diff']:.2e}")
    print(f"student test acc: {d1['student_test_acc']:.4f} vs {d2['student_test_acc']:.4f} "
          f"({d1['test_images']} images); int8: {q1['int8_test_acc']:.4f} vs {q2['int8_test_acc']:.4f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
