"""Benchmark: what SubDistill costs next to KD on the default config, as the real stages run it.

Runs the real `subspaces` and `distill` stages (StageContext into temporary folders) of configs/fashion_tops.yaml
on a given adapted teacher, for distill.method kd and subdistill, with the epochs cut to --epochs, and records each
stage's wall time and the distill loop's training images/s (`train_images_per_s`, the loop alone). Run it once with
this checkout's code and once with another checkout's (PYTHONPATH) to compare code versions in one session:

    A=/work/main/builds/fashion_tops/adapt-<key>
    flock /work/heavy.lock sh -c "PYTHONPATH=/path/to/old .venv/bin/python bench/subdistill_cost.py --adapt $A --label before; \
                                  PYTHONPATH=$PWD .venv/bin/python bench/subdistill_cost.py --adapt $A --label after"
Appends to bench/results/subdistill_cost.json (one entry per run) and prints a table of all entries.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE.parent / "configs" / "fashion_tops.yaml"
RESULTS = HERE / "results" / "subdistill_cost.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapt", type=Path, required=True, help="the adapt/ folder of the default config")
    p.add_argument("--label", default="this checkout", help="name of the code version in the table")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=["kd", "subdistill"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layer-positions", type=int, default=None,
                   help="distill.layer_positions for subdistill (positions per pair at which its loss is evaluated)")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def config_for(method: str, epochs: int, layer_positions: int | None = None, layer_every: int | None = None,
               seed: int | None = None):
    """The default config with distill.method, epochs and (if given) distill.layer_positions,
    distill.layer_every and build.seed replaced."""
    from pipeline.config import parse_config

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["distill"].update({"method": method, "epochs": epochs})
    if seed is not None:
        raw["build"]["seed"] = seed
    if layer_positions:
        raw["distill"]["layer_positions"] = layer_positions
    if layer_every:
        raw["distill"]["layer_every"] = layer_every
    return parse_config(raw)


def config_for_variant(variant: str, epochs: int = 1, seed: int | None = None):
    """The config of a variant: a method, optionally with `:positions=N` (distill.layer_positions; a bare `:N`
    means the same) and `:every=N` (distill.layer_every), e.g. subdistill:every=4."""
    method, *options = variant.split(":")
    settings = dict(option.partition("=")[::2] if "=" in option else ("positions", option) for option in options)
    unknown = set(settings) - {"positions", "every"}
    if unknown:
        raise SystemExit(f"variant {variant!r}: unknown option(s) {sorted(unknown)}; use :positions=N or :every=N")
    number = lambda name: int(settings[name]) if name in settings else None  # noqa: E731
    return config_for(method, epochs, number("positions"), number("every"), seed)


def run(args) -> list[dict]:
    import pipeline
    from rich.console import Console

    from pipeline.progress import ProgressDisplay
    from pipeline.runner import run_stage
    from pipeline.stages import SubspacesStage

    quiet = ProgressDisplay(Console(quiet=True), enabled=False)
    torch.set_num_threads(args.threads)
    rows = []
    for method in args.methods:
        cfg = config_for(method, args.epochs, args.layer_positions if method.startswith("subdistill") else None)
        inputs = {"adapt": args.adapt}
        row = {"code": args.label, "pipeline": str(Path(pipeline.__file__).parent), "method": method,
               "epochs": args.epochs, "threads": args.threads, "layer_positions": cfg.distill.layer_positions}
        with tempfile.TemporaryDirectory() as sub_out, tempfile.TemporaryDirectory() as dist_out:
            if SubspacesStage().enabled(cfg):
                start = time.perf_counter()
                metrics = run_stage(cfg, "subspaces", Path(sub_out), inputs, quiet)
                row["subspaces_s"] = round(time.perf_counter() - start, 1)
                row["targets_mib"] = metrics.get("targets_mib")
                inputs["subspaces"] = Path(sub_out)
            start = time.perf_counter()
            metrics = run_stage(cfg, "distill", Path(dist_out), inputs, quiet)
            row["distill_s"] = round(time.perf_counter() - start, 1)
        row["loop_img_s"] = round(metrics["train_images_per_s"], 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def table(entries: list[dict]) -> str:
    """Ratios are throughputs relative to KD's of the same code version: >1 faster, <1 slower."""
    head = (f"{'code':<14} {'method':<11} {'subspaces s':>11} {'distill s':>9} {'loop img/s':>10} "
            f"{'loop vs kd':>10} {'distill stage vs kd':>19} {'+ subspaces vs kd':>17}")
    lines = [head, "-" * len(head)]
    kd = {(e["code"], e["epochs"]): e for e in entries if e["method"] == "kd"}
    for e in entries:
        base = kd.get((e["code"], e["epochs"]))
        nan = float("nan")
        loop = e["loop_img_s"] / base["loop_img_s"] if base else nan
        stage = base["distill_s"] / e["distill_s"] if base else nan
        both = base["distill_s"] / (e["distill_s"] + e.get("subspaces_s", 0.0)) if base else nan
        lines.append(f"{e['code']:<14} {e['method']:<11} {e.get('subspaces_s', 0.0):>11.1f} {e['distill_s']:>9.1f} "
                     f"{e['loop_img_s']:>10.0f} {loop:>9.2f}x {stage:>18.2f}x {both:>16.2f}x")
    return "\n".join(lines)


def record(out: Path, label: str, rows: list[dict], table_of) -> None:
    """Replace the runs named `label` in the JSON file `out` by `rows` (keeping the others), and write and print
    table_of(all runs) next to it as .txt."""
    previous = json.loads(out.read_text()) if out.exists() else {"runs": []}
    previous["runs"] = [r for r in previous["runs"] if r["code"] != label] + rows
    previous["environment"] = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                               "cores": torch.get_num_threads()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(previous, indent=1) + "\n")
    text = table_of(previous["runs"])
    out.with_suffix(".txt").write_text(text + "\n")
    print(text)


def main(argv=None) -> None:
    args = parse_args(argv)
    record(args.out, args.label, run(args), table)


if __name__ == "__main__":
    sys.exit(main())
