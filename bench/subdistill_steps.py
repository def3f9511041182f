"""Benchmark: SubDistill's training step next to KD's on the default config, step by step, alternating.

Builds the real distill stage's inputs (DistillStage.prepare) of configs/fashion_tops.yaml for each method on a
given adapted teacher (and, for SubDistill, the targets of one `subspaces` stage run), then times optimizer steps
on the same batches, alternating the methods step by step (A B, B A, ...), and reports medians and their ratio.
On a shared VM whose speed drifts by +-25 % within minutes, this keeps the drift out of the ratio better than
whole epochs run one after the other (bench/subdistill_rounds.py), which it complements: those time the loop as
the stage runs it, this the step alone.

    .venv/bin/python bench/subdistill_steps.py --adapt builds/fashion_tops/adapt-<key> --steps 400 --label "this tree"
Appends to bench/results/subdistill_steps.json (one entry per label) and prints the table of all entries.

--methods takes two or more variants, the baseline first, with subdistill_rounds.py's syntax (e.g. kd
subdistill:every=1 subdistill:every=4); each is timed `--block` steps at a time (a lazy layer loss,
distill.layer_every = n, is on one step of n, so a block must hold whole cycles of it; medians of the block times).

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
    p.add_argument("--methods", nargs="+", default=["kd", "subdistill:every=1"],
                   help="variants (method[:positions=N][:every=N]), baseline first")
    p.add_argument("--block", type=int, default=4, help="consecutive steps of one variant timed as one unit")
    p.add_argument("--ablations", action="store_true", help="also time SubDistill steps with parts taken out")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if len(args.methods) < 2:
        p.error("--methods needs a baseline and at least one variant to time against it, e.g. kd subdistill")
    if args.ablations and not args.methods[1].startswith("subdistill"):
        p.error(f"--ablations takes parts out of a SubDistill step; the second method is {args.methods[1]!r}. "
                "Use --methods kd subdistill (or subdistill_unit), or drop --ablations.")
    return args


def no_layer_loss(method, teacher_out) -> None:
    method.layer_losses = lambda _out: {}


def no_layer_loss_no_targets(method, teacher_out) -> None:
    no_layer_loss(method, teacher_out)
    logits = teacher_out.cached[0]
    teacher_out.for_batch = lambda idx, _raw, _layers=True: (logits[idx].to(teacher_out.device), {})


def layer_loss_on_8_images(method, teacher_out, images: int = 8) -> None:
    # Batches are shuffled, so the first images are a random subset; only their targets are gathered.
    logits, store = teacher_out.cached
    teacher_out.for_batch = lambda idx, _raw, layers=True: (logits[idx].to(teacher_out.device),
                                                         store.batch(idx[:images], teacher_out.device) if layers else {})
    full = type(method).layer_losses

    def layer_losses(out):
        out.student_feats = {i: f[:images] for i, f in out.student_feats.items()}
        return full(method, out)
    method.layer_losses = layer_losses


ABLATIONS = {"no layer loss": no_layer_loss, "no layer loss, no targets": no_layer_loss_no_targets,
             "layer loss on 8 images": layer_loss_on_8_images}


def stepper(variant: str, adapt: Path, subspaces: Path, scratch: Path, progress, ablation=None):
    """A function that runs one optimizer step of `variant` on given transfer rows, the transfer set's size and the
    variant's layer_every. `ablation` (one of ABLATIONS) takes a part out of the method's step."""
    from subdistill_cost import config_for_variant   # bench/ is this script's folder on sys.path

    from pipeline.distill.train import loop_parts, optimizer_step
    from pipeline.runner import stage_context
    from pipeline.stages import DistillStage

    cfg = config_for_variant(variant)
    stage = DistillStage()
    inputs = {"adapt": adapt, **({"subspaces": subspaces} if "subspaces" in stage.inputs(cfg) else {})}
    run = stage.prepare(stage_context(cfg, "distill", scratch / variant.replace(":", "_"), inputs, progress))
    parts = loop_parts(run.models, run.method, run.train, run.settings)
    run.models.student.train(), run.method.train()
    if ablation is not None:
        ablation(run.method, parts.teacher_out)
    device = run.settings.device
    return (lambda idx: optimizer_step(parts, run.method, idx, parts.images[idx], parts.labels[idx], device),
            len(run.train.images), run.method.layer_every)


def measure(args) -> dict:
    from rich.console import Console

    from pipeline.data.views import batches
    from pipeline.progress import ProgressDisplay
    from pipeline.runner import run_stage
    from subdistill_cost import config_for_variant

    torch.set_num_threads(args.threads)
    quiet = ProgressDisplay(Console(quiet=True), enabled=False)
    subdistill = next((m for m in args.methods if m.startswith("subdistill")), None)
    with tempfile.TemporaryDirectory() as scratch:
        subspaces = Path(scratch) / "subspaces"
        if subdistill is not None:
            run_stage(config_for_variant(subdistill), "subspaces", subspaces, {"adapt": args.adapt}, quiet)
        steps = {m: stepper(m, args.adapt, subspaces, Path(scratch), quiet) for m in args.methods}
        for name, ablation in (ABLATIONS.items() if args.ablations else ()):
            steps[name] = stepper(args.methods[1], args.adapt, subspaces, Path(scratch) / name, quiet, ablation)
        uneven = {m: every for m, (_, _, every) in steps.items() if args.block % every}
        if uneven:
            raise SystemExit(f"--block {args.block} does not hold whole cycles of the lazy layer loss of {uneven}: "
                             "use a multiple of every variant's distill.layer_every")
        torch.set_num_threads(args.threads)      # the stage context seeds (and sets threads) as a build does
        size = min(n for _, n, _ in steps.values())
        order = list(steps)
        rows = list(batches(size, 64, shuffle=True, generator=torch.Generator().manual_seed(0)))
        times: dict[str, list[float]] = {m: [] for m in order}
        warmup = -(-WARMUP // args.block)
        for j in range(warmup + -(-args.steps // args.block)):
            block = [rows[(j * args.block + b) % len(rows)] for b in range(args.block)]
            for m in (order if j % 2 else order[::-1]):
                start = time.perf_counter()
                for idx in block:
                    steps[m][0](idx)
                if j >= warmup:
                    times[m].append((time.perf_counter() - start) * 1e3 / args.block)
    median = {m: statistics.median(t) for m, t in times.items()}
    base = median[args.methods[0]]
    entry = {"code": args.label, "methods": list(args.methods[:2]), "steps": args.steps, "block": args.block,
             "threads": args.threads,
             "median_ms": {m: round(median[m], 3) for m in args.methods},
             "p90_ms": {m: round(statistics.quantiles(times[m], n=10)[-1], 3) for m in args.methods},
             "throughput_vs_baseline": round(base / median[args.methods[1]], 3)}
    if len(args.methods) > 2:
        entry["variants"] = {m: {"median_ms": round(median[m], 3), "throughput_vs_baseline": round(base / median[m], 3)}
                             for m in args.methods[2:]}
    if args.ablations:
        entry["ablations"] = {m: {"median_ms": round(median[m], 3), "throughput_vs_baseline": round(base / median[m], 3)}
                              for m in ABLATIONS}
    return entry


def table(entries: list[dict]) -> str:
    """Step times are per step (a block's time / its steps, medians over blocks; older entries: single steps)."""
    head = f"{'code':<34} {'baseline':>8} {'ms/step':>8} {'method':>18} {'ms/step':>8} {'throughput vs baseline':>22}"
    lines = [head, "-" * len(head)]
    for e in entries:
        a, b = e["methods"]
        lines.append(f"{e['code']:<34} {a:>8} {e['median_ms'][a]:>8.2f} {b:>18} {e['median_ms'][b]:>8.2f} "
                     f"{e['throughput_vs_baseline']:>21.2f}x")
        for name, part in {**e.get("variants", {}), **e.get("ablations", {})}.items():
            label = name if name in e.get("variants", {}) else b + ": " + name
            lines.append(f"{'  ' + label:<62} {part['median_ms']:>8.2f} {part['throughput_vs_baseline']:>21.2f}x")
    return "\n".join(lines)


def main(argv=None) -> None:
    from subdistill_cost import record

    args = parse_args(argv)
    record(args.out, args.label, [measure(args)], table)


if __name__ == "__main__":
    main()
