"""Per-layer time from the runtimes' own profilers, in one format:

    {"runtime": "onnxruntime", "runs": 200, "total_ms": 0.041,
     "layers": [{"name": "/features/features.0/Conv_quant", "op": "QLinearConv", "kernel": "QLinearConv (CPUExecutionProvider)",
                 "precision": "int8", "mean_ms": 0.0093, "share": 0.23}, ...]}     (slowest first)

`name` is the node as the runtime executed it (after its fusions), so it is a node of the runtime's optimized
graph; `precision` is what the kernel computed in (int8, fp32, bf16, ...; "convert" for quantize/dequantize
nodes that only change the representation)."""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

# ONNX Runtime ops that compute in integers, and ops that only convert between int8 and float
ORT_INT8_OPS = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "QGemm",
                "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSigmoid",
                "QLinearLeakyRelu", "QLinearConcat", "QLinearSoftmax", "DynamicQuantizeMatMul", "NhwcQLinearConv"}
ORT_CONVERT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
TOP_LAYERS = 60   # kept per artifact (the small students have fewer)


def ort_precision(op: str) -> str:
    if op in ORT_INT8_OPS:
        return "int8"
    return "convert" if op in ORT_CONVERT_OPS else "fp32"


def openvino_precision(exec_type: str, node_type: str = "") -> str:
    """OpenVINO CPU kernels end in their precision: brgconv_avx512_I8, jit_avx2_FP32, ref_any_BF16 ..."""
    if node_type in ("FakeQuantize", "Convert") or exec_type.lower().startswith("unknown"):
        return "convert" if node_type in ("FakeQuantize", "Convert") else "fp32"
    suffix = exec_type.rsplit("_", 1)[-1].upper()
    return {"I8": "int8", "U8": "int8", "FP32": "fp32", "F32": "fp32", "BF16": "bf16", "FP16": "fp16",
            "F16": "fp16", "I32": "int32"}.get(suffix, "fp32")


def summarize_layers(runtime: str, samples: Iterable[tuple[str, str, str, str, float]], runs: int) -> dict:
    """samples: (name, op, kernel, precision, milliseconds) for every execution of every layer in `runs` calls."""
    total: dict[str, float] = defaultdict(float)
    info: dict[str, tuple[str, str, str]] = {}
    for name, op, kernel, precision, ms in samples:
        total[name] += ms
        info.setdefault(name, (op, kernel, precision))
    rows = [{"name": name, "op": info[name][0], "kernel": info[name][1], "precision": info[name][2],
             "mean_ms": t / runs} for name, t in total.items()]
    rows.sort(key=lambda r: -r["mean_ms"])
    whole = sum(r["mean_ms"] for r in rows)
    for r in rows:
        r["share"] = r["mean_ms"] / whole if whole > 0 else 0.0
    by_precision: dict[str, float] = defaultdict(float)
    for r in rows:
        by_precision[r["precision"]] += r["mean_ms"]
    return {"runtime": runtime, "runs": runs, "total_ms": whole, "layers_executed": len(rows),
            "ms_by_precision": dict(by_precision), "layers": rows[:TOP_LAYERS]}
