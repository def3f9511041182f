"""What does INT8 cost in accuracy and buy in speed, per model and quantization recipe?

Models: student architectures trained here on the Fashion-MNIST tops subtask (labels only, short), and the
default build's adapted EfficientNet-Lite0 teacher (--teacher-dir, its adapt stage folder; the 4 subtask columns
of its head). Recipes, each from the same float model (BatchNorm folded) and calibration images:
  ptq          NNCF calibration,
  ptq_aac      NNCF accuracy control at --max-drop (quantize_with_accuracy_control on the ONNX export reverts
               the most harmful layers to float; the torch model is held to the same drop, see quantize/precision.py),
  qat          PTQ + fine-tuning with the KD loss against the float model's logits,
  qat_keep     as qat with qat.keep_fp32: [auto] (the --keep-count layers with the largest per-layer error in float).
Every model is exported to FP32 / INT8 ONNX; measured in ONNX Runtime: test accuracy, batch-1 latency of the
bound call (device_tests runners: IOBinding, calls back to back, warm-up discarded, all variants of a model in
alternating rounds so load from elsewhere hits all alike), which layers stayed in float and how many
convolutions ONNX Runtime still runs as INT8 kernels.

    python -m bench quantization --archs cnn_small cnn_compact --teacher-dir builds/fashion_tops/adapt-<key>
    python -m bench quantization --quick             # cnn_small on 100 images per class, 1 epoch each
Prints a table and writes bench/results/quantize.json (one key per model, each with its own provenance stamp;
reruns update their keys).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench._common import DEFAULT_CONFIG, parse, parser, provenance, write_results
from exporters.formats import fused_ops
from exporters.onnx_export import export_onnx, export_onnx_int8
from exporters.parity import onnxruntime_runner, run_batched
from pipeline.config import config_with
from pipeline.data import View, batches
from pipeline.data.for_config import subtask_data
from pipeline.data.views import as_tensor
from pipeline.distill.config import DistillConfig
from pipeline.models import count_params, create_model
from quantize.config import QATConfig
from quantize.fold import fold_batchnorm
from quantize.nncf_ops import calibration_batches
from quantize.precision import quantize_student
from quantize.qat import TrainSet, distillation_loss, finetune, model_accuracy

CLASSES = ["T-shirt/top", "Pullover", "Shirt", "Coat"]
FASHION_IDS = [0, 2, 6, 4]   # those classes' ids in Fashion-MNIST (the teacher's head columns)
VIEW = View(28, 1, (0.5,), (0.5,))
RECIPES = ("ptq", "ptq_aac", "qat", "qat_keep")


def parse_args(argv=None):
    p = parser("quantization", __doc__, results="quantize.json")
    p.add_argument("--archs", nargs="*", default=["cnn_small", "cnn_compact"])
    p.add_argument("--teacher-dir", type=Path, help="adapt stage folder of a build (teacher.pt, teacher.json)")
    p.add_argument("--train-per-class", type=int, default=1500, help="training images per class (cap)")
    p.add_argument("--epochs", type=int, default=4, help="FP32 training epochs of the students")
    p.add_argument("--qat-epochs", type=int, default=2)
    p.add_argument("--qat-max-images", type=int, default=None, help="cap on images per QAT epoch")
    p.add_argument("--qat-lr", type=float, default=1e-4)
    p.add_argument("--calibration", type=int, default=300)
    p.add_argument("--max-drop", type=float, default=0.005, help="accuracy control: validation drop allowed")
    p.add_argument("--keep-count", type=int, default=1, help="qat_keep: layers kept in float")
    p.add_argument("--val-images", type=int, default=None, help="cap on validation images (accuracy control)")
    p.add_argument("--test-images", type=int, default=None, help="cap on test images (accuracy)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads for latency")
    p.add_argument("--min-queries", type=int, default=1024, help="timed batch-1 calls per model (at least)")
    p.add_argument("--min-seconds", type=float, default=3.0, help="minimum timed duration per model")
    p.add_argument("--seed", type=int, default=0)
    args = parse(p, argv)
    if args.quick:
        args.archs, args.train_per_class, args.epochs, args.qat_epochs = ["cnn_small"], 100, 1, 1
        args.calibration, args.min_queries, args.min_seconds = 32, 64, 0.2
    return args


class Columns(torch.nn.Module):
    """The teacher restricted to the subtask's columns of its head."""

    def __init__(self, model: torch.nn.Module, columns: list[int]):
        super().__init__()
        self.model = model
        self.register_buffer("columns", torch.tensor(columns), persistent=False)

    def forward(self, x):
        return self.model(x).index_select(1, self.columns)


def train_fp32(arch: str, data, epochs: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model(arch, data.num_classes, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    x, y = as_tensor(data.train.images), torch.as_tensor(data.train.labels)
    gen = torch.Generator().manual_seed(seed)
    # cosine decay: a converged float model, so QAT's gains are not just "more training"
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * -(-len(x) // 64))
    for _ in range(epochs):
        model.train()
        for idx in batches(len(x), 64, shuffle=True, generator=gen):
            loss = torch.nn.functional.cross_entropy(model(VIEW(x[idx])), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def ort_accuracy(path: Path, inputs: np.ndarray, labels: np.ndarray) -> float:
    logits = run_batched(onnxruntime_runner(path), inputs, 64)
    return float((logits.argmax(1) == labels).mean())


def latency(paths: dict[str, Path], x: np.ndarray, threads: int, queries: int, seconds: float, rounds: int = 4) -> dict:
    """Per model: p50/p90/mean of the bound batch-1 call (microseconds), over alternating rounds."""
    from device_tests.runners import get_runner

    runners = {name: get_runner("onnxruntime")(path, "onnx", threads=threads).__enter__() for name, path in paths.items()}
    bound = {}
    for name, runner in runners.items():
        bound[name] = runner.bind((1, *x.shape[1:]))
        np.copyto(bound[name].input, x[:1])
        for _ in range(100):
            bound[name].run()  # warm-up, discarded
    samples: dict[str, list[int]] = {name: [] for name in paths}
    clock = time.perf_counter_ns
    for _ in range(rounds):
        for name, b in bound.items():
            run, start, n = b.run, time.perf_counter(), 0
            while n < queries // rounds or time.perf_counter() - start < seconds / rounds:
                t0 = clock()
                run()
                samples[name].append(clock() - t0)
                n += 1
    for runner in runners.values():
        runner.__exit__()
    return {name: {"queries": len(t), "p50_us": float(np.percentile(t, 50)) / 1e3, "p90_us": float(np.percentile(t, 90)) / 1e3,
                   "mean_us": float(np.mean(t)) / 1e3} for name, t in samples.items()}


def recipe_config(recipe: str, args) -> QATConfig:
    mode = {"ptq": "ptq", "ptq_aac": "ptq_accuracy_control", "qat": "qat", "qat_keep": "qat"}[recipe]
    keep = ["auto"] if recipe == "qat_keep" else []
    return QATConfig(mode=mode, max_drop=args.max_drop, keep_fp32=keep, keep_fp32_count=args.keep_count,
                     calibration_size=args.calibration)


def bench_model(name: str, fp32: torch.nn.Module, view: View, data, args, work: Path) -> dict:
    val_n, test_n = args.val_images or len(data.val), args.test_images or len(data.test)
    val_x, val_y = view(as_tensor(data.val.images[:val_n])), data.val.labels[:val_n]
    test_x, test_y = view(as_tensor(data.test.images[:test_n])).numpy(), data.test.labels[:test_n]
    example = val_x[:1]
    folded = fold_batchnorm(fp32)[0]
    rng = np.random.default_rng(args.seed)
    pick = np.sort(rng.permutation(len(data.train))[:args.calibration])
    calibration = calibration_batches([view(as_tensor(data.train.images[pick]))])
    paths = {"fp32": work / f"{name}.onnx"}
    export_onnx(fp32, paths["fp32"], example, 17, True)
    result: dict = {"model": name, "params": count_params(fp32), "recipes": {}}
    target = None
    for recipe in RECIPES:
        start = time.perf_counter()
        cfg = recipe_config(recipe, args)
        try:
            model, info = quantize_student(folded, calibration, val_x, val_y, cfg, log=lambda m: print("   ", m))
        except Exception as exc:  # noqa: BLE001 (a recipe that fails is a result: record it, go on)
            result["recipes"][recipe] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"  {recipe}: failed: {exc}")
            continue
        if cfg.mode == "qat":
            if target is None:
                with torch.no_grad():
                    target = torch.cat([fp32(view(as_tensor(data.train.images[i.numpy()])))
                                        for i in batches(len(data.train), 256)])
            info["qat_val_history"] = finetune(
                model, view, TrainSet(data.train.images, data.train.labels, target),
                lambda m: model_accuracy(m, view, data.val.images[:val_n], val_y),
                distillation_loss(DistillConfig(temperature=4.0, label_weight=0.5)), args.qat_epochs, args.qat_lr, 64,
                seed=args.seed, max_images=args.qat_max_images)
        paths[recipe] = work / f"{name}.{recipe}.onnx"
        export_onnx_int8(model, paths[recipe], example, 17, True)
        ops = fused_ops(paths[recipe])
        int8 = ops.get("QLinearConv", 0) + ops.get("ConvInteger", 0)
        result["recipes"][recipe] = {"seconds": round(time.perf_counter() - start, 1), "kept_fp32": info["kept_fp32"],
                                     "quantized_layers": len(info["quantized_layers"]),
                                     "onnxruntime_int8_convs": int8,
                                     "onnxruntime_float_convs": ops.get("Conv", 0) + ops.get("FusedConv", 0),
                                     **{k: info[k] for k in ("accuracy_control", "qat_val_history") if k in info}}
        print(f"  {recipe}: {result['recipes'][recipe]['seconds']} s, kept in float: {info['kept_fp32'] or 'none'}", flush=True)
    result["test_acc_onnxruntime"] = {k: ort_accuracy(p, test_x, test_y) for k, p in paths.items()}
    result["val_acc_fp32_torch"] = model_accuracy(folded, view, data.val.images[:val_n], val_y)
    result["latency_batch1"] = latency(paths, test_x, args.threads, args.min_queries, args.min_seconds)
    result["file_kib"] = {k: round(p.stat().st_size / 1024, 1) for k, p in paths.items()}
    return result


def environment(args) -> dict:
    """What the provenance stamp does not hold: the runtime versions and this run's settings."""
    import nncf
    import onnxruntime

    return {"ort_threads": args.threads, "onnxruntime": onnxruntime.__version__, "nncf": nncf.__version__,
            "settings": {k: str(v) for k, v in vars(args).items() if k not in ("archs", "out", "command")}}


def print_table(results: dict) -> None:
    print(f"\n{'model':<13}{'recipe':<10}{'test acc':>9}{'p50 us':>9}{'x FP32':>8}  {'INT8/float convs':>16}  kept in float")
    for name, r in results.items():
        lat, acc = r["latency_batch1"], r["test_acc_onnxruntime"]
        print(f"{name:<13}{'fp32':<10}{acc['fp32'] * 100:>8.2f}%{lat['fp32']['p50_us']:>9.1f}{1.0:>8.2f}")
        for recipe in RECIPES:
            rr = r["recipes"].get(recipe, {})
            if "error" in rr or recipe not in acc:
                print(f"{'':<13}{recipe:<10}  failed: {rr.get('error', '?')[:90]}")
                continue
            print(f"{'':<13}{recipe:<10}{acc[recipe] * 100:>8.2f}%{lat[recipe]['p50_us']:>9.1f}"
                  f"{lat['fp32']['p50_us'] / lat[recipe]['p50_us']:>8.2f}  "
                  f"{rr['onnxruntime_int8_convs']:>7}/{rr['onnxruntime_float_convs']:<8}  {', '.join(rr['kept_fp32']) or '-'}")
    print("x FP32 = FP32 p50 / this p50 (ONNX Runtime, bound batch-1 call); accuracies on the test split in ONNX Runtime")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(2)
    cfg = config_with(DEFAULT_CONFIG, {"build.seed": args.seed, "data.train_per_class": args.train_per_class,
                                       "subtask": {"classes": CLASSES}})
    data = subtask_data(cfg)
    stamp = provenance(args.command)        # per model: a rerun replaces only its models' entries
    stored = json.loads(args.out.read_text()) if args.out.is_file() else {}
    models = stored.get("models", {})
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            print(f"{arch}: training, quantizing, measuring ...", flush=True)
            start = time.perf_counter()
            fp32 = train_fp32(arch, data, args.epochs, args.seed)
            models[arch] = bench_model(arch, fp32, VIEW, data, args, Path(tmp))
            models[arch].update(train_s=round(time.perf_counter() - start, 1), environment=environment(args),
                                provenance=stamp)
        if args.teacher_dir:
            from pipeline.models import load_teacher

            print("teacher: quantizing, measuring ...", flush=True)
            teacher, spec = load_teacher(args.teacher_dir)
            models["teacher"] = bench_model("teacher", Columns(teacher.eval(), FASHION_IDS).eval(), spec.input, data,
                                            args, Path(tmp))
            models["teacher"].update(arch=spec.arch, environment=environment(args), provenance=stamp)
    write_results(args.out, {"models": models}, args.command)
    print_table(models)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
