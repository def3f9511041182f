"""Benchmark: SubDistill's distill-loop throughput next to KD's, interleaved over rounds (medians), on a noisy host.

One `subspaces` stage, then the real `distill` stage of configs/fashion_tops.yaml for each variant in turn, one
epoch each, `rounds` times; a variant is a method, optionally with `:positions=N` (distill.layer_positions; a bare
`:N` means the same) and `:every=N` (distill.layer_every):

    .venv/bin/python bench/subdistill_rounds.py --adapt builds/fashion_tops/adapt-<key> --rounds 3 \
        kd subdistill:every=1 subdistill:positions=64 subdistill:every=4
Single runs of bench/subdistill_cost.py swing by +-25 % on a shared 2-core VM; interleaving keeps the drift out of
the ratios. Writes bench/results/subdistill_rounds.json and prints the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main(argv=None) -> None:
    from rich.console import Console
    from subdistill_cost import config_for_variant as config_for   # bench/ is this script's folder on sys.path

    from pipeline.progress import ProgressDisplay
    from pipeline.runner import run_stage

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapt", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=HERE / "results" / "subdistill_rounds.json")
    p.add_argument("variants", nargs="+", help="the first is the baseline of the ratios, e.g. kd")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    quiet = ProgressDisplay(Console(quiet=True), enabled=False)
    runs: dict[str, list[float]] = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory() as subspaces:
        run_stage(config_for("subdistill"), "subspaces", Path(subspaces), {"adapt": args.adapt}, quiet)
        for round_ in range(args.rounds):
            for variant in args.variants:
                with tempfile.TemporaryDirectory() as out:
                    metrics = run_stage(config_for(variant), "distill", Path(out),
                                        {"adapt": args.adapt, "subspaces": Path(subspaces)}, quiet)
                runs[variant].append(round(metrics["train_images_per_s"], 1))
                print(round_, variant, runs[variant][-1], flush=True)
    base = statistics.median(runs[args.variants[0]])
    rows = [{"variant": v, "median_img_s": statistics.median(r), "vs_first": round(statistics.median(r) / base, 3),
             "runs": r} for v, r in runs.items()]
    for row in rows:
        print(f"{row['variant']:<16} {row['median_img_s']:8.0f} img/s  {row['vs_first']:.2f}x  runs {row['runs']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "torch": torch.__version__}, indent=1) + "\n")


if __name__ == "__main__":
    main()
