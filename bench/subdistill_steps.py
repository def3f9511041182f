"""Benchmark: SubDistill's training step next to KD's on the default config, step by step, alternating.

Builds the real distill stage's inputs (DistillStage.prepare) of configs/fashion_tops.yaml for each method on a
given adapted teacher (and, for SubDistill, the targets of one `subspaces` stage run), then times optimizer steps
on the same batches, alternating the methods step by step (A B, B A, ...), and reports medians and their ratio.
On a shared VM whose speed drifts by +-25 % within minutes, this keeps the drift out of the ratio better than
whole epochs run one after the other (bench/subdistill_rounds.py), which it complements: those time the loop as
the stage runs it, this the step alone.

    .venv/bin/python bench/subdistill_steps.py --adapt builds/fashion_tops/adapt-<key> --steps 400 --label "this tree"
Appends to bench/results/subdistill_steps.json (one entry per label) and prints the table of all entries.

--ablations also times, alternated with the two, SubDistill steps with parts taken out (ABLATIONS), to show where
its extra time goes: without the layer losses (targets still gathered, features tapped, V stepped and retracted),
without the layer losses and the target gather, and with the layer losses on 8 of the batch's 64 images.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "subdistill_steps.json"
WARMUP = 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapt", type=Path, required=True, help="the adapt/ folder of the default config")
    p.add_argument("--steps", type=int, default=400, help="timed steps per method (after 20 warm-up steps)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--label", default="this checkout", help="name of the code version in the table")
    p.add_argument("--methods", nargs=2, default=["kd", "subdistill"], help="baseline first")
    p.add_argument("--ablations", action="store_true", help="also time SubDistill steps with parts taken out")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.ablations and not args.methods[1].startswith("subdistill"):
        p.error(f"--ablations takes parts out of a SubDistill step; the second method is {args.methods[1]!r}. "
                "Use --methods kd subdistill (or subdistill_unit), or drop --ablations.")
    return args


def no_layer_loss(method, teacher_out) -> None:
    method.layer_losses = lambda _out: {}


def no_layer_loss_no_targets(method, teacher_out) -> None:
    no_layer_loss(method, teacher_out)
    logits = teacher_out.cached[0]
    teacher_out.for_batch = lambda idx, _raw: (logits[idx].to(teacher_out.device), {})


def layer_loss_on_8_images(method, teacher_out, images: int = 8) -> None:
    # Batches are shuffled, so the first images are a random subset; only their targets are gathered.
    logits, store = teacher_out.cached
    teacher_out.for_batch = lambda idx, _raw: (logits[idx].to(teacher_out.device),
                                            store.batch(idx[:images], teacher_out.device))
    full = type(method).layer_losses

    def layer_losses(out):
        out.student_feats = {i: f[:images] for i, f in out.student_feats.items()}
        return full(method, out)
    method.layer_losses = layer_losses


ABLATIONS = {"no layer loss": no_layer_loss, "no layer loss, no targets": no_layer_loss_no_targets,
             "layer loss on 8 images": layer_loss_on_8_images}


def stepper(method: str, adapt: Path, subspaces: Path, scratch: Path, progress, ablation=None):
    """A function that runs one optimizer step of `method` on given transfer rows, and the transfer set's size.
    `ablation` (one of ABLATIONS) takes a part out of the method's step."""
    from subdistill_cost import config_for   # bench/ is this script's folder on sys.path

    from pipeline.distill.train import loop_parts, optimizer_step
    from pipeline.runner import stage_context
    from pipeline.stages import DistillStage

    cfg = config_for(method, 1)
    stage = DistillStage()
    inputs = {"adapt": adapt, **({"subspaces": subspaces} if "subspaces" in stage.inputs(cfg) else {})}
    run = stage.prepare(stage_context(cfg, "distill", scratch / method, inputs, progress))
    parts = loop_parts(run.models, run.method, run.train, run.settings)
    run.models.student.train(), run.method.train()
    if ablation is not None:
        ablation(run.method, parts.teacher_out)
    device = run.settings.device
    return (lambda idx: optimizer_step(parts, run.method, idx, parts.images[idx], parts.labels[idx], device),
            len(run.train.images))


def measure(args) -> dict:
    from rich.console import Console

    from pipeline.data.views import batches
    from pipeline.progress import ProgressDisplay
    from pipeline.runner import run_stage
    from subdistill_cost import config_for

    torch.set_num_threads(args.threads)
    quiet = ProgressDisplay(Console(quiet=True), enabled=False)
    with tempfile.TemporaryDirectory() as scratch:
        subspaces = Path(scratch) / "subspaces"
        run_stage(config_for(args.methods[1], 1), "subspaces", subspaces, {"adapt": args.adapt}, quiet)
        steps = {m: stepper(m, args.adapt, subspaces, Path(scratch), quiet) for m in args.methods}
        for name, ablation in (ABLATIONS.items() if args.ablations else ()):
            steps[name] = stepper(args.methods[1], args.adapt, subspaces, Path(scratch) / name, quiet, ablation)
        torch.set_num_threads(args.threads)      # the stage context seeds (and sets threads) as a build does
        size = min(n for _, n in steps.values())
        order = list(steps)
        rows = list(batches(size, 64, shuffle=True, generator=torch.Generator().manual_seed(0)))
        times: dict[str, list[float]] = {m: [] for m in order}
        for j in range(WARMUP + args.steps):
            idx = rows[j % len(rows)]
            for m in (order if j % 2 else order[::-1]):
                start = time.perf_counter()
                steps[m][0](idx)
                if j >= WARMUP:
                    times[m].append((time.perf_counter() - start) * 1e3)
    median = {m: statistics.median(t) for m, t in times.items()}
    base, other = (median[m] for m in args.methods)
    entry = {"code": args.label, "methods": list(args.methods), "steps": args.steps, "threads": args.threads,
             "median_ms": {m: round(median[m], 3) for m in args.methods},
             "p90_ms": {m: round(statistics.quantiles(times[m], n=10)[-1], 3) for m in args.methods},
             "throughput_vs_baseline": round(base / other, 3)}
    if args.ablations:
        entry["ablations"] = {m: {"median_ms": round(median[m], 3), "throughput_vs_baseline": round(base / median[m], 3)}
                              for m in ABLATIONS}
    return entry


def table(entries: list[dict]) -> str:
    head = f"{'code':<34} {'baseline':>8} {'ms/step':>8} {'method':>10} {'ms/step':>8} {'throughput vs baseline':>22}"
    lines = [head, "-" * len(head)]
    for e in entries:
        a, b = e["methods"]
        lines.append(f"{e['code']:<34} {a:>8} {e['median_ms'][a]:>8.2f} {b:>10} {e['median_ms'][b]:>8.2f} "
                     f"{e['throughput_vs_baseline']:>21.2f}x")
        for name, part in e.get("ablations", {}).items():
            lines.append(f"{'  ' + b + ': ' + name:<54} {part['median_ms']:>8.2f} {part['throughput_vs_baseline']:>21.2f}x")
    return "\n".join(lines)


def main(argv=None) -> None:
    from subdistill_cost import record

    args = parse_args(argv)
    record(args.out, args.label, [measure(args)], table)


if __name__ == "__main__":
    main()
