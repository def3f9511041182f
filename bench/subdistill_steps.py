"""What does SubDistill cost next to KD: time per training step, and (--seeds) accuracy of a lazy layer loss?

Step timing (the default). Builds the real distill stage's inputs (DistillStage.prepare) of
configs/fashion_tops.yaml for each variant on a given adapted teacher (and, for SubDistill, the targets of one
`subspaces` stage run), then times optimizer steps on the same batches, alternating the variants block by block
(A B, B A, ...), and reports medians and their ratio to the first. Alternating keeps the host's speed drift (which
can reach +-25 % within minutes on a small VM) out of the ratio; whole epochs run one after the other do not.

    python -m bench subdistill_steps --adapt builds/fashion_tops/adapt-<key> --steps 400 --label "this tree"
    python -m bench subdistill_steps --adapt ... --steps 768 --block 32 \
        --methods kd subdistill:every=1 subdistill:every=4 subdistill:every=8
    python -m bench subdistill_steps --adapt ... --ablations        # where SubDistill's extra time goes
Appends to bench/results/subdistill_steps.json (one entry per --label, each with its own provenance stamp) and
writes the table of all entries next to it as .txt.

--methods takes two or more variants, the baseline first: a distill.method, optionally with `:every=N`
(distill.layer_every: the layer loss on one optimizer step of N, weighted N x). Each is timed `--block` steps at a
time, so a block must hold whole cycles of every variant's layer_every; medians of the block times per step.
--ablations also times, alternated with the two, SubDistill steps with parts taken out (ABLATIONS): without the
layer losses (targets still gathered, features tapped, V stepped and retracted), without the layer losses and the
target gather, and with the layer losses on 8 of the batch's 64 images.

Accuracy (--seeds S ...). For each seed, the real `subspaces` stage and then the real `distill` stage for each
variant in turn (the default config's 12 epochs); build.seed changes the subspace estimate's positions, the
student's initialisation and the batch order. Records each student's test accuracy (of the best validation epoch):

    python -m bench subdistill_steps --adapt ... --seeds 0 1 2 3 4 \
        --methods kd subdistill:every=1 subdistill:every=4 subdistill:every=8      # about 11 min per variant
Writes bench/results/subdistill_layer_every.{json,txt} (mean and sample standard deviation over the seeds); runs of
other seeds or variants already in the file are kept (a run of the same variant and seed is replaced), so seeds
can be added later.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench._common import DEFAULT_CONFIG, parse, parser, provenance, quiet_progress, write_results
from pipeline.config import config_with

STEPS_RESULTS = "subdistill_steps.json"
SEEDS_RESULTS = "subdistill_layer_every.json"
WARMUP = 20


def parse_args(argv=None):
    p = parser("subdistill_steps", __doc__, results=STEPS_RESULTS)
    p.add_argument("--adapt", type=Path, required=True, help="the adapt/ folder of the default config")
    p.add_argument("--methods", nargs="+", default=["kd", "subdistill:every=1"],
                   help="variants (method[:every=N]), baseline first")
    p.add_argument("--threads", type=int, default=2)
    steps = p.add_argument_group("step timing")
    steps.add_argument("--steps", type=int, default=400, help="timed steps per variant (after 20 warm-up steps)")
    steps.add_argument("--block", type=int, default=4, help="consecutive steps of one variant timed as one unit")
    steps.add_argument("--label", default="this checkout", help="name of the code version in the table")
    steps.add_argument("--ablations", action="store_true", help="also time SubDistill steps with parts taken out")
    seeds = p.add_argument_group("accuracy")
    seeds.add_argument("--seeds", type=int, nargs="+", default=None,
                       help=f"train each variant once per seed instead of timing steps (writes {SEEDS_RESULTS})")
    seeds.add_argument("--epochs", type=int, default=12, help="distill.epochs (the default config's: 12)")
    args = parse(p, argv, results_for=lambda a: STEPS_RESULTS if a.seeds is None else SEEDS_RESULTS)
    if args.quick:      # a handful of steps, or one seed of one epoch
        args.steps, args.epochs, args.seeds = 16, 1, args.seeds and args.seeds[:1]
    if len(args.methods) < 2:
        p.error("--methods needs a baseline and at least one variant to compare with it, e.g. kd subdistill")
    if args.ablations and not args.methods[1].startswith("subdistill"):
        p.error(f"--ablations takes parts out of a SubDistill step; the second method is {args.methods[1]!r}. "
                "Use --methods kd subdistill, or drop --ablations.")
    return args


def config_for_variant(variant: str, epochs: int | None = None, seed: int | None = None):
    """The default config with a variant's distill.method and (`:every=N`) distill.layer_every, e.g.
    subdistill:every=4; epochs and build.seed replaced when given."""
    method, *options = variant.split(":")
    settings = dict(option.partition("=")[::2] for option in options)
    if set(settings) - {"every"} or not all(v.isdigit() for v in settings.values()):
        raise SystemExit(f"variant {variant!r}: write it as method or method:every=N")
    overrides = {"distill.method": method}
    if "every" in settings:
        overrides["distill.layer_every"] = int(settings["every"])
    if epochs is not None:
        overrides["distill.epochs"] = epochs
    if seed is not None:
        overrides["build.seed"] = seed
    return config_with(DEFAULT_CONFIG, overrides)


# -- step timing -------------------------------------------------------------------------------------------------

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


def time_steps(args) -> dict:
    from pipeline.data import batches
    from pipeline.runner import run_stage

    torch.set_num_threads(args.threads)
    quiet = quiet_progress()
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
        rows = list(batches(size, 64, shuffle=True, generator=torch.Generator().manual_seed(0)))
        times = alternated_block_times({m: step for m, (step, _, _) in steps.items()}, rows, args)
    return step_entry(times, args)


def alternated_block_times(steps: dict, rows: list, args) -> dict[str, list[float]]:
    """Milliseconds per step of each block, the variants' blocks alternated (A B, B A, ...)."""
    order = list(steps)
    times: dict[str, list[float]] = {m: [] for m in order}
    warmup = -(-WARMUP // args.block)
    for j in range(warmup + -(-args.steps // args.block)):
        block = [rows[(j * args.block + b) % len(rows)] for b in range(args.block)]
        for m in (order if j % 2 else order[::-1]):
            start = time.perf_counter()
            for idx in block:
                steps[m](idx)
            if j >= warmup:
                times[m].append((time.perf_counter() - start) * 1e3 / args.block)
    return times


def step_entry(times: dict[str, list[float]], args) -> dict:
    median = {m: statistics.median(t) for m, t in times.items()}
    base = median[args.methods[0]]

    def versus(m: str) -> dict:
        return {"median_ms": round(median[m], 3), "throughput_vs_baseline": round(base / median[m], 3)}

    entry = {"code": args.label, "methods": list(args.methods[:2]), "steps": args.steps, "block": args.block,
             "threads": args.threads,
             "median_ms": {m: round(median[m], 3) for m in args.methods},
             "p90_ms": {m: round(statistics.quantiles(times[m], n=10)[-1], 3) for m in args.methods},
             "throughput_vs_baseline": round(base / median[args.methods[1]], 3)}
    if len(args.methods) > 2:
        entry["variants"] = {m: versus(m) for m in args.methods[2:]}
    if args.ablations:
        entry["ablations"] = {m: versus(m) for m in ABLATIONS}
    return entry


def steps_table(entries: list[dict]) -> str:
    """Step times are per step (a block's time / its steps, medians over blocks; block 1: single steps)."""
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


def record_steps(args, entry: dict) -> None:
    """Replace the entries labelled like `entry` in the results file (keeping the others), stamp it, write all."""
    previous = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
    previous.pop("environment", None)       # each entry's stamp says where it ran
    entry["provenance"] = provenance(args.command)
    runs = [r for r in previous["runs"] if r["code"] != entry["code"]] + [entry]
    write_results(args.out, {**previous, "runs": runs}, args.command, table=steps_table(runs))
    print(steps_table(runs))


# -- accuracy over seeds -----------------------------------------------------------------------------------------

def train_seeds(args) -> list[dict]:
    from pipeline.runner import run_stage

    quiet = quiet_progress()
    layered = next((v for v in args.methods if v.startswith("subdistill")), None)
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as subspaces:
            if layered is not None:
                run_stage(config_for_variant(layered, args.epochs, seed), "subspaces", Path(subspaces),
                          {"adapt": args.adapt}, quiet)
            for variant in args.methods:
                rows.append(train_variant(args, variant, seed, Path(subspaces), quiet))
                print(json.dumps(rows[-1]), flush=True)
    return rows


def train_variant(args, variant: str, seed: int, subspaces: Path, quiet) -> dict:
    from pipeline.runner import run_stage

    cfg = config_for_variant(variant, args.epochs, seed)
    inputs = {"adapt": args.adapt, **({"subspaces": subspaces} if variant.startswith("subdistill") else {})}
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        metrics = run_stage(cfg, "distill", Path(out), inputs, quiet)
        wall = time.perf_counter() - start
    return {"variant": variant, "seed": seed, "layer_every": cfg.distill.layer_every,
            "test_acc": metrics["student_test_acc"], "best_val_acc": metrics["best_val_acc"],
            "best_epoch": metrics["best_epoch"], "loop_img_s": round(metrics["train_images_per_s"], 1),
            "distill_s": round(wall, 1)}


def seeds_summary(rows: list[dict]) -> list[dict]:
    """Per variant, in the order first recorded: test accuracy mean and sample std over seeds."""
    spread = lambda xs: statistics.stdev(xs) if len(xs) > 1 else float("nan")  # noqa: E731
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        acc = [100 * r["test_acc"] for r in mine]
        out.append({"variant": variant, "seeds": [r["seed"] for r in mine],
                    "test_acc_mean": round(statistics.mean(acc), 3), "test_acc_std": round(spread(acc), 3),
                    "test_acc": [round(a, 2) for a in acc], "best_epochs": [r["best_epoch"] for r in mine]})
    return out


def seeds_table(summaries: list[dict]) -> str:
    """Accuracy only: the loop img/s of runs one after the other measure the host's drift as much as the method
    (the step timing measures throughput)."""
    head = f"{'variant':<22} {'seeds':>7} {'test % mean':>11} {'+- std':>7} {'per seed':>36}"
    lines = [head, "-" * len(head)]
    for s in summaries:
        lines.append(f"{s['variant']:<22} {len(s['seeds']):>7} {s['test_acc_mean']:>11.2f} {s['test_acc_std']:>7.2f} "
                     f"{' / '.join(f'{a:.2f}' for a in s['test_acc']):>36}")
    return "\n".join(lines)


def record_seeds(args, rows: list[dict]) -> None:
    """The runs already in the results file (but those of a variant and seed run again) plus `rows`, stamped."""
    previous = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
    stamp = provenance(args.command)
    again = {(r["variant"], r["seed"]) for r in rows}
    runs = [r for r in previous["runs"] if (r["variant"], r["seed"]) not in again] + [{**r, "provenance": stamp}
                                                                                   for r in rows]
    summary = seeds_summary(runs)
    report = {"what": "real subspaces + distill stages of configs/fashion_tops.yaml per seed and variant (variants "
                      "in turn within a seed); test accuracy of the best validation epoch",
              "epochs": args.epochs, "threads": args.threads, "summary": summary, "runs": runs}
    write_results(args.out, report, args.command, table=seeds_table(summary))
    print(seeds_table(summary))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.seeds is not None:
        record_seeds(args, train_seeds(args))
    else:
        record_steps(args, time_steps(args))


if __name__ == "__main__":
    main()
