"""Benchmark: what a lazy SubDistill layer loss (distill.layer_every) costs in accuracy and buys in throughput.

For each seed, the real `subspaces` stage and then the real `distill` stage of configs/fashion_tops.yaml for each
variant (subdistill_rounds.py's syntax: kd, subdistill:every=1, subdistill:every=4, ...), the variants run one
after the other within a seed so that the VM's drift is shared; build.seed changes the subspace estimate's
positions, the student's initialisation and the batch order. Records the student's test accuracy (the best
validation epoch's), that epoch, the distill loop's training images/s and its ratio to the first variant's in
the same seed:

    .venv/bin/python bench/subdistill_lazy.py --adapt builds/fashion_tops/adapt-<key> --seeds 0 1 2 \\
        --variants kd subdistill:every=1 subdistill:every=2 subdistill:every=4
Writes bench/results/subdistill_lazy.{json,txt} (means and sample standard deviations over the seeds); runs of
other seeds or variants already in the JSON file are kept (a run of the same variant and seed is replaced), so more
seeds can be added later: --seeds 3 4 --variants kd subdistill:every=1 subdistill:every=4.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "subdistill_lazy.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapt", type=Path, required=True, help="the adapt/ folder of the default config")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=12, help="distill.epochs (the default config's: 12)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--variants", nargs="+", default=["kd", "subdistill:every=1", "subdistill:every=4"],
                   help="the first is the baseline of the throughput ratios, e.g. kd")
    return p.parse_args(argv)


def run(args) -> list[dict]:
    from rich.console import Console
    from subdistill_cost import config_for_variant   # bench/ is this script's folder on sys.path

    from pipeline.progress import ProgressDisplay
    from pipeline.runner import run_stage

    quiet = ProgressDisplay(Console(quiet=True), enabled=False)
    layered = next((v for v in args.variants if v.startswith("subdistill")), None)
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as subspaces:
            if layered is not None:
                run_stage(config_for_variant(layered, args.epochs, seed), "subspaces", Path(subspaces),
                          {"adapt": args.adapt}, quiet)
            for variant in args.variants:
                cfg = config_for_variant(variant, args.epochs, seed)
                inputs = {"adapt": args.adapt, **({"subspaces": Path(subspaces)} if variant.startswith("subdistill") else {})}
                torch.set_num_threads(args.threads)
                with tempfile.TemporaryDirectory() as out:
                    start = time.perf_counter()
                    metrics = run_stage(cfg, "distill", Path(out), inputs, quiet)
                    wall = time.perf_counter() - start
                row = {"variant": variant, "seed": seed, "layer_every": cfg.distill.layer_every,
                       "test_acc": metrics["student_test_acc"], "best_val_acc": metrics["best_val_acc"],
                       "best_epoch": metrics["best_epoch"], "loop_img_s": round(metrics["train_images_per_s"], 1),
                       "distill_s": round(wall, 1)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def summary(rows: list[dict], variants: list[str]) -> list[dict]:
    """Per variant: test accuracy mean and std over seeds, and the loop throughput relative to the baseline's
    in the same seed (mean and std of the per-seed ratios)."""
    base = {r["seed"]: r["loop_img_s"] for r in rows if r["variant"] == variants[0]}
    spread = lambda xs: statistics.stdev(xs) if len(xs) > 1 else float("nan")  # noqa: E731
    out = []
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        acc = [100 * r["test_acc"] for r in mine]
        ratio = [r["loop_img_s"] / base[r["seed"]] for r in mine]
        out.append({"variant": variant, "seeds": [r["seed"] for r in mine],
                    "test_acc_mean": round(statistics.mean(acc), 3), "test_acc_std": round(spread(acc), 3),
                    "test_acc": [round(a, 2) for a in acc], "best_epochs": [r["best_epoch"] for r in mine],
                    "img_s_mean": round(statistics.mean(r["loop_img_s"] for r in mine), 1),
                    "throughput_vs_first_mean": round(statistics.mean(ratio), 3),
                    "throughput_vs_first_std": round(spread(ratio), 3)})
    return out


def table(summaries: list[dict]) -> str:
    head = (f"{'variant':<22} {'seeds':>7} {'test % mean':>11} {'+- std':>7} {'per seed':>24} "
            f"{'img/s':>7} {'vs first':>9} {'+- std':>7}")
    lines = [head, "-" * len(head)]
    for s in summaries:
        lines.append(f"{s['variant']:<22} {len(s['seeds']):>7} {s['test_acc_mean']:>11.2f} {s['test_acc_std']:>7.2f} "
                     f"{' / '.join(f'{a:.2f}' for a in s['test_acc']):>24} {s['img_s_mean']:>7.0f} "
                     f"{s['throughput_vs_first_mean']:>8.3f}x {s['throughput_vs_first_std']:>7.3f}")
    return "\n".join(lines)


def merged(out: Path, rows: list[dict]) -> list[dict]:
    """The runs recorded in `out` (but those of a variant and seed run again) followed by `rows`."""
    previous = json.loads(out.read_text())["runs"] if out.exists() else []
    again = {(r["variant"], r["seed"]) for r in rows}
    return [r for r in previous if (r["variant"], r["seed"]) not in again] + rows


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = merged(args.out, run(args))
    summaries = summary(rows, list(dict.fromkeys(r["variant"] for r in rows)))   # the first recorded is the baseline
    write(args, rows, summaries)


def write(args, rows: list[dict], summaries: list[dict]) -> None:
    text = table(summaries)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "what": "real subspaces + distill stages of configs/fashion_tops.yaml per seed and variant (variants in turn "
                "within a seed); test accuracy of the best validation epoch; loop img/s relative to the first variant "
                "of the same seed",
        "epochs": args.epochs, "threads": args.threads, "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "summary": summaries, "runs": rows}, indent=1) + "\n")
    args.out.with_suffix(".txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
