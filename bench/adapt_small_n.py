"""Which adapt settings suit few labels? Chosen on the labelled validation split.

For a label budget of N images per subtask class (data.labels_per_class; round(0.2 N), at most N/4, held out for
validation), the ImageNet EfficientNet-Lite0 of configs/fashion_tops.yaml gets a new head over the subtask classes
and is fitted on the N - N/5 training labels per class with every setting of a grid: where training starts
(train_from: classifier = linear probe, conv_head, blocks.6, blocks.5), epochs, learning rate, weight decay. The
frozen prefix runs once per image (its outputs are cached and pushed through the later stages for the deeper cuts),
so the whole grid costs a few teacher passes. The setting with the best VALIDATION accuracy is chosen (ties: the
cheaper one, i.e. fewer trainable stages, then fewer epochs); its test accuracy is reported next to all others'.
configs/fashion_tops_50labels.yaml uses its choice at N = 50.

    python -m bench adapt_small_n --labels 50 --seeds 0 1 2
    python -m bench adapt_small_n --quick          # 2 settings, 300 test images
Writes bench/results/adapt_small_n.json and .txt.
"""

from __future__ import annotations

import copy
import itertools
import statistics
import time
from pathlib import Path

import torch

from bench._common import DEFAULT_CONFIG, parse, parser, quiet_progress, settings, write_results
from pipeline.config import config_with
from pipeline.data import View
from pipeline.data.for_config import subtask_data
from pipeline.data.views import as_tensor
from pipeline.models import load_teacher
from pipeline.models.fit import FitSettings, fit_classifier
from pipeline.models.layout import channels_last, channels_last_model
from pipeline.models.predict import accuracy
from pipeline.models.split import sequential_parts
from pipeline.runner import Build

QUIET = quiet_progress()
CUTS = ["classifier", "conv_head", "blocks.6", "blocks.5"]       # cheapest first (the tie-break order)


def parse_args(argv=None):
    p = parser("adapt_small_n", __doc__)
    p.add_argument("--labels", type=int, nargs="+", default=[50], help="labels per class N")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--classes", nargs="+", default=["T-shirt/top", "Pullover", "Coat", "Shirt"])
    p.add_argument("--cuts", nargs="+", default=CUTS)
    p.add_argument("--epochs", type=int, nargs="+", default=[10, 30])
    p.add_argument("--probe-epochs", type=int, nargs="+", default=[30, 100], help="epochs of the linear probe")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    p.add_argument("--probe-lrs", type=float, nargs="+", default=[3e-3, 1e-2])
    p.add_argument("--weight-decays", type=float, nargs="+", default=[1e-4, 0.05])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--test-per-class", type=int, default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: with other work on 2 cores, 2 threads can be much slower)")
    args = parse(p, argv)
    if args.quick:
        args.labels, args.seeds, args.cuts, args.epochs, args.probe_epochs = [8], [0], ["classifier", "blocks.6"], [1], [2]
        args.lrs, args.probe_lrs, args.weight_decays, args.test_per_class = [1e-3], [1e-2], [1e-4], 75
    return args


def grid(args) -> list[dict]:
    settings = []
    for cut in args.cuts:
        probe = cut == "classifier"
        for epochs, lr, wd in itertools.product(args.probe_epochs if probe else args.epochs,
                                                args.probe_lrs if probe else args.lrs, args.weight_decays):
            settings.append({"train_from": cut, "method": "linear_probe" if probe else "finetune",
                             "epochs": epochs, "lr": lr, "weight_decay": wd})
    return settings


def base_config(args, n: int, seed: int):
    overrides = {"build.seed": seed, "subtask": {"classes": args.classes}, "data.labels_per_class": n,
                 "data.unlabelled": "none"}
    if args.test_per_class:
        overrides["data.test_per_class"] = args.test_per_class
    return config_with(DEFAULT_CONFIG, overrides, remove=("ood",))


@torch.no_grad()
def features_at_cuts(model, view: View, images, cuts: list[str]) -> dict[str, torch.Tensor]:
    """Input of each cut's first module for every image: the prefix runs once, later stages chain on from it."""
    parts = sequential_parts(model)
    names = [n for n, _ in parts]
    order = sorted(cuts, key=names.index)
    out, source = {}, as_tensor(images)
    model.eval()
    with channels_last_model(model):
        chunks = []
        first = names.index(order[0])
        for start in range(0, len(source), 128):
            x = channels_last(view(source[start:start + 128]))
            for _, module in parts[:first]:
                x = module(x)
            chunks.append(x)
        x = torch.cat(chunks)
        position = first
        for cut in order:
            for _, module in parts[position:names.index(cut)]:
                x = torch.cat([module(x[i:i + 512]) for i in range(0, len(x), 512)])
            position = names.index(cut)
            out[cut] = x.contiguous()
    return out


def tail_of(model, cut: str) -> torch.nn.Sequential:
    parts = sequential_parts(model)
    names = [n for n, _ in parts]
    return torch.nn.Sequential(*[m for _, m in parts[names.index(cut):]])


def fit_setting(pristine, setting: dict, feats: dict, labels: dict, batch_size: int, seed: int) -> dict:
    model = copy.deepcopy(pristine)
    tail = tail_of(model, setting["train_from"])
    train_x, val_x, test_x = (feats[split][setting["train_from"]] for split in ("train", "val", "test"))
    train_y = torch.as_tensor(labels["train"])

    @torch.no_grad()
    def predict(x):
        tail.eval()
        return torch.cat([tail(channels_last(x[i:i + 512])).float() for i in range(0, len(x), 512)])

    settings = FitSettings(setting["epochs"], setting["lr"], setting["weight_decay"], batch_size, seed)
    start = time.perf_counter()
    with channels_last_model(tail):
        result = fit_classifier(tail, len(train_x), lambda idx: (channels_last(train_x[idx]), train_y[idx]),
                                lambda: accuracy(predict(val_x), labels["val"]), settings, QUIET, "adapt")
        test_acc = accuracy(predict(test_x), labels["test"])
    return {**setting, "val_acc": result["best_val_acc"], "best_epoch": result["best_epoch"], "test_acc": test_acc,
            "fit_s": round(time.perf_counter() - start, 2)}


def choose(results: list[dict], cuts: list[str]) -> dict:
    """Best validation accuracy; ties go to the cheaper setting (earlier cut in CUTS order, then fewer epochs)."""
    return max(results, key=lambda r: (r["val_acc"], -cuts.index(r["train_from"]), -r["epochs"]))


def run_one(args, n: int, seed: int) -> dict:
    cfg = base_config(args, n, seed)
    teacher_dir = Path(Build(cfg).run(QUIET, until="teacher")[-1]["dir"])
    model, spec = load_teacher(teacher_dir)
    view = spec.input
    data = subtask_data(cfg)
    model.reset_classifier(data.num_classes)
    torch.manual_seed(seed)
    start = time.perf_counter()
    splits = {"train": data.train, "val": data.val, "test": data.test}
    feats = {name: features_at_cuts(model, view, s.images, args.cuts) for name, s in splits.items()}
    labels = {name: s.labels for name, s in splits.items()}
    prefix_s = time.perf_counter() - start
    results = []
    for setting in grid(args):
        results.append(fit_setting(model, setting, feats, labels, args.batch_size, seed))
        r = results[-1]
        print(f"  N={n} seed={seed} {r['train_from']:<10} ep {r['epochs']:>3} lr {r['lr']:g} wd {r['weight_decay']:g}: "
              f"val {r['val_acc'] * 100:5.1f} test {r['test_acc'] * 100:5.2f} ({r['fit_s']} s)", flush=True)
    chosen = choose(results, [c for c in CUTS if c in args.cuts] + [c for c in args.cuts if c not in CUTS])
    best_test = max(results, key=lambda r: r["test_acc"])
    return {"labels_per_class": n, "seed": seed, "train_images": len(data.train), "val_images": len(data.val),
            "test_images": len(data.test), "prefix_s": round(prefix_s, 1), "chosen": chosen,
            "best_on_test (not a choice)": best_test, "results": results}


def report(runs: list[dict]) -> str:
    lines = []
    for n in sorted({r["labels_per_class"] for r in runs}):
        mine = [r for r in runs if r["labels_per_class"] == n]
        accs = [r["chosen"]["test_acc"] for r in mine]
        spread = f" +- {statistics.stdev(accs) * 100:.2f}" if len(accs) > 1 else ""
        lines.append(f"N = {n} labels per class: chosen on validation -> test {statistics.mean(accs) * 100:.2f}{spread} % "
                     f"over seeds {[r['seed'] for r in mine]}")
        for r in mine:
            c = r["chosen"]
            lines.append(f"  seed {r['seed']}: {c['method']} from {c['train_from']}, {c['epochs']} epochs, lr {c['lr']}, "
                         f"wd {c['weight_decay']}: val {c['val_acc'] * 100:.1f} % ({r['val_images']} images), "
                         f"test {c['test_acc'] * 100:.2f} %")
        header = f"  {'train_from':<11} {'epochs':>6} {'lr':>7} {'wd':>6}  " + "  ".join(f"val/test s{r['seed']}" for r in mine)
        lines.append(header)
        for i, s in enumerate(mine[0]["results"]):
            cells = "  ".join(f"{r['results'][i]['val_acc'] * 100:5.1f}/{r['results'][i]['test_acc'] * 100:5.1f}" for r in mine)
            lines.append(f"  {s['train_from']:<11} {s['epochs']:>6} {s['lr']:>7g} {s['weight_decay']:>6g}  {cells}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    runs = [run_one(args, n, seed) for n in args.labels for seed in args.seeds]
    text = report(runs)
    print(text)
    out = {"args": settings(args), "runs": runs, "wall_s": round(time.perf_counter() - start, 1),
           "threads": torch.get_num_threads()}
    write_results(args.out, out, args.command, table=text)
    return out


if __name__ == "__main__":
    main()
