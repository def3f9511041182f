"""Benchmark: what INT8 costs in accuracy and buys in speed, per student architecture.

For each architecture: train an FP32 student on the Fashion-MNIST tops subtask (labels only, short), then
  PTQ  = fold BatchNorm + NNCF calibration,
  QAT  = PTQ + fine-tuning with the KD loss against the FP32 student's logits (the goal of QAT is to recover
         the float model, so the float model is the teacher here; the qat stage uses the real teacher),
export FP32 / PTQ-INT8 / QAT-INT8 ONNX and measure accuracy in ONNX Runtime on the test split, and ONNX Runtime
latency of FP32 vs QAT-INT8 at batch 1 and 64 (warm-up discarded, >= N queries and a minimum duration, FP32
and INT8 measured in alternating rounds so load from other processes hits both alike).

    .venv/bin/python bench/quantize.py --archs cnn_small cnn_medium
Prints a table and writes bench/results/quantize.json (one key per architecture; reruns update their keys).
The committed results came from (2 cores, quiet machine, nice 10; ~1 and ~5 minutes):
    bench/quantize.py --archs cnn_small --train-per-class 4800 --epochs 5
    bench/quantize.py --archs cnn_medium --train-per-class 4800 --epochs 4
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exporters.onnx_export import export_onnx, export_onnx_int8  # noqa: E402
from exporters.parity import onnxruntime_runner, run_batched  # noqa: E402
from pipeline.config import parse_config  # noqa: E402
from pipeline.data import View, batches  # noqa: E402
from pipeline.data.views import as_tensor  # noqa: E402
from pipeline.distill.config import DistillConfig  # noqa: E402
from pipeline.models import count_params, create_model  # noqa: E402
from pipeline.stages.common import subtask_data  # noqa: E402
from quantize.fold import fold_batchnorm  # noqa: E402
from quantize.nncf_ops import calibration_batches, quantize_ptq  # noqa: E402
from quantize.qat import TrainSet, model_accuracy, distillation_loss, finetune  # noqa: E402

CLASSES = ["T-shirt/top", "Pullover", "Shirt", "Coat"]
VIEW = View(28, 1, (0.5,), (0.5,))
RESULTS = ROOT / "bench" / "results" / "quantize.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=["cnn_small", "cnn_medium"])
    p.add_argument("--train-per-class", type=int, default=1500, help="training images per class (cap)")
    p.add_argument("--epochs", type=int, default=4, help="FP32 training epochs")
    p.add_argument("--qat-epochs", type=int, default=2)
    p.add_argument("--qat-lr", type=float, default=1e-4)
    p.add_argument("--calibration", type=int, default=300)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads for latency")
    p.add_argument("--min-queries", type=int, default=1024, help="timed batch-1 queries per model (at least)")
    p.add_argument("--min-seconds", type=float, default=3.0, help="minimum timed duration per model and batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", type=Path, default=RESULTS, help="JSON file to write (reruns update their archs)")
    return p.parse_args(argv)


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
    logits = run_batched(onnxruntime_runner(path), inputs, 256)
    return float((logits.argmax(1) == labels).mean())


def timed(run, x: np.ndarray, queries: int, seconds: float) -> list[float]:
    times, start = [], time.perf_counter()
    while len(times) < queries or time.perf_counter() - start < seconds:
        t0 = time.perf_counter_ns()
        run(x)
        times.append((time.perf_counter_ns() - t0) / 1e3)
    return times


def latency(paths: dict[str, Path], batch: int, threads: int, queries: int, seconds: float, rounds: int = 4) -> dict:
    """Per model: p50/p90/p99/mean in microseconds and images per second, over alternating rounds."""
    x = np.random.default_rng(0).standard_normal((batch, 1, 28, 28)).astype(np.float32)
    runners = {name: onnxruntime_runner(path, threads=threads) for name, path in paths.items()}
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for name, run in runners.items():
        for _ in range(50 if batch == 1 else 5):
            run(x)  # warm-up, discarded
    for _ in range(rounds):
        for name, run in runners.items():
            samples[name] += timed(run, x, max(queries // rounds, 1), seconds / rounds)
    out = {}
    for name, times in samples.items():
        t = np.asarray(times)
        out[name] = {"queries": len(t), "p50_us": float(np.percentile(t, 50)), "p90_us": float(np.percentile(t, 90)),
                     "p99_us": float(np.percentile(t, 99)), "mean_us": float(t.mean()),
                     "images_per_s": float(batch * 1e6 / t.mean())}
    return out


def bench_arch(arch: str, data, args, work: Path) -> dict:
    test_x = VIEW(as_tensor(data.test.images)).numpy()
    result: dict = {"arch": arch}
    start = time.perf_counter()
    fp32 = train_fp32(arch, data, args.epochs, args.seed)
    result["params"] = count_params(fp32)
    result["train_s"] = round(time.perf_counter() - start, 1)
    example = VIEW(as_tensor(data.val.images[:1]))
    paths = {"fp32": work / f"{arch}.onnx", "ptq": work / f"{arch}.ptq.onnx", "qat": work / f"{arch}.qat.onnx"}
    export_onnx(fp32, paths["fp32"], example, 17, True)

    rng = np.random.default_rng(args.seed)
    pick = np.sort(rng.permutation(len(data.train))[:args.calibration])
    ptq = quantize_ptq(fold_batchnorm(fp32)[0], calibration_batches([VIEW(as_tensor(data.train.images[pick]))]))
    export_onnx_int8(ptq, paths["ptq"], example, 17, True)

    qat = copy.deepcopy(ptq)
    with torch.no_grad():
        target = torch.cat([fp32(VIEW(as_tensor(data.train.images[i.numpy()])))
                            for i in batches(len(data.train), 512)])
    start = time.perf_counter()
    history = finetune(qat, VIEW, TrainSet(data.train.images, data.train.labels, target),
                       lambda m: model_accuracy(m, VIEW, data.val.images, data.val.labels),
                       distillation_loss(DistillConfig(temperature=4.0, label_weight=0.5)),
                       args.qat_epochs, args.qat_lr, 64, seed=args.seed)
    result["qat_s"] = round(time.perf_counter() - start, 1)
    result["qat_val_history"] = history
    export_onnx_int8(qat, paths["qat"], example, 17, True)

    result["test_acc_onnxruntime"] = {k: ort_accuracy(p, test_x, data.test.labels) for k, p in paths.items()}
    result["test_acc_torch"] = {"fp32": model_accuracy(fp32, VIEW, data.test.images, data.test.labels),
                                "ptq": model_accuracy(ptq, VIEW, data.test.images, data.test.labels),
                                "qat": model_accuracy(qat, VIEW, data.test.images, data.test.labels)}
    result["file_kib"] = {k: round(p.stat().st_size / 1024, 1) for k, p in paths.items()}
    result["latency"] = {}
    for batch in (1, 64):
        queries = args.min_queries if batch == 1 else max(args.min_queries // 16, 64)
        lat = latency({"fp32": paths["fp32"], "int8": paths["qat"]}, batch, args.threads, queries, args.min_seconds)
        lat["speedup_p50"] = lat["fp32"]["p50_us"] / lat["int8"]["p50_us"]
        result["latency"][f"batch{batch}"] = lat
    return result


def environment(args) -> dict:
    import nncf
    import onnxruntime

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "ort_threads": args.threads, "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__, "nncf": nncf.__version__, "python": platform.python_version(),
            "settings": {k: v for k, v in vars(args).items() if k not in ("archs", "results")}}


def print_table(results: dict) -> None:
    print(f"\n{'arch':<11}{'params':>9}  {'acc FP32':>9}{'PTQ':>8}{'QAT':>8}  (ONNX Runtime, test)   "
          f"{'b1 p50 FP32/INT8 us':>21}{'x':>6}  {'b64 p50 FP32/INT8 us':>22}{'x':>6}")
    for arch, r in results.items():
        acc, b1, b64 = r["test_acc_onnxruntime"], r["latency"]["batch1"], r["latency"]["batch64"]
        print(f"{arch:<11}{r['params']:>9,}  {acc['fp32'] * 100:>8.2f}%{acc['ptq'] * 100:>7.2f}%{acc['qat'] * 100:>7.2f}%"
              f"{'':>24}{b1['fp32']['p50_us']:>10.0f}/{b1['int8']['p50_us']:<10.0f}{b1['speedup_p50']:>5.2f}x"
              f"  {b64['fp32']['p50_us']:>10.0f}/{b64['int8']['p50_us']:<11.0f}{b64['speedup_p50']:>5.2f}x")
    print("x = FP32 p50 / INT8 p50 (INT8/FP32 speed-up); p90 and p99 in the JSON")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(2)
    cfg = parse_config({"build": {"name": "bench", "seed": args.seed},
                        "data": {"train_per_class": args.train_per_class}, "subtask": {"classes": CLASSES},
                        "teacher": {"source": "train"}, "student": {"arch": "cnn_small"}})
    data = subtask_data(cfg)
    stored = json.loads(args.results.read_text()) if args.results.is_file() else {}
    archs = stored.get("archs", {})
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            print(f"{arch}: training, quantizing, measuring ...", flush=True)
            archs[arch] = bench_arch(arch, data, args, Path(tmp))
            archs[arch]["environment"] = environment(args)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"archs": archs}, indent=2, sort_keys=True) + "\n")
    print_table(archs)
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
