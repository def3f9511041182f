"""The runtimes' own benchmark tools, run on the same artifact with the same threads and batch 1, so the
suite's figure can be checked against the runtime's: OpenVINO's benchmark_app, TensorRT's trtexec, ONNX
Runtime's onnxruntime_perf_test. A tool that is not installed on the target is recorded as such (status
"not installed"), never guessed. Arguments are lists (no shell); the model path is the artifact's."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

TIMEOUT_S = 300


def find_tool(name: str) -> Optional[str]:
    """On PATH, or next to this Python (a venv's bin/, where pip puts benchmark_app)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else shutil.which(name)


def run_tool(runtime: str, fmt: str, path: Path, threads: int, shape: tuple[int, ...], seconds: float,
             precision_hint: str = "f32") -> Optional[dict]:
    """The runtime's tool on `path` at batch 1, or None when the runtime has no such tool for this format."""
    if runtime == "openvino":
        return benchmark_app(path, threads, shape, seconds, precision_hint)
    if runtime == "onnxruntime":
        return ort_perf_test(path, threads, shape, seconds)
    if runtime == "tensorrt":
        return trtexec(path, fmt, shape, seconds)
    return None


def _run(cmd: list[str], tool: str) -> tuple[Optional[str], Optional[dict]]:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, {"tool": tool, "status": "error", "message": f"did not finish in {TIMEOUT_S} s", "command": cmd}
    if proc.returncode != 0:
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-4:])
        return None, {"tool": tool, "status": "error", "message": f"exit {proc.returncode}: {tail}", "command": cmd}
    return proc.stdout + proc.stderr, None


def _shape_arg(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def benchmark_app(path: Path, threads: int, shape: tuple[int, ...], seconds: float, precision_hint: str) -> dict:
    """1 stream, sync API (one request after another, like the suite), batch 1, the suite's thread count and
    precision hint. Its median is OpenVINO's own timing of each infer() (InferRequest.latency)."""
    exe = find_tool("benchmark_app")
    if exe is None:
        return {"tool": "benchmark_app", "status": "not installed"}
    cmd = [exe, "-m", str(path), "-d", "CPU", "-hint", "none", "-api", "sync", "-nstreams", "1", "-b", "1",
           "-shape", _shape_arg(shape), "-t", str(max(1, round(seconds))), "-infer_precision", precision_hint]
    if threads:
        cmd += ["-nthreads", str(threads)]
    out, error = _run(cmd, "benchmark_app")
    if error:
        return error
    median = _latency(out, "Median")
    if median is None:
        return {"tool": "benchmark_app", "status": "error", "message": "no 'Median' latency in its output", "command": cmd}
    return {"tool": "benchmark_app", "status": "measured", "median_ms": median, "mean_ms": _latency(out, "Average"),
            "min_ms": _latency(out, "Min"), "iterations": _int(out, r"Count:\s+(\d+)"), "command": cmd}


def ort_perf_test(path: Path, threads: int, shape: tuple[int, ...], seconds: float) -> dict:
    """onnxruntime_perf_test (built from ONNX Runtime's sources; the pip wheels do not ship it): CPU provider,
    sequential executor, the suite's intra-op threads, random input, free dimensions set to batch 1."""
    exe = find_tool("onnxruntime_perf_test")
    if exe is None:
        return {"tool": "onnxruntime_perf_test", "status": "not installed"}
    cmd = [exe, "-e", "cpu", "-m", "duration", "-t", str(max(1, round(seconds))), "-I", "-S", "1"]
    if threads:
        cmd += ["-x", str(threads), "-y", "1"]
    for name in _free_dims(path):
        cmd += ["-f", f"{name}:1"]
    with tempfile.TemporaryDirectory() as tmp:
        out, error = _run([*cmd, str(path), str(Path(tmp) / "result.txt")], "onnxruntime_perf_test")
    if error:
        return error
    median = _seconds(out, "P50 Latency")
    mean = _float(out, r"Average inference time cost[^:]*:\s*([\d.]+)\s*ms")
    if median is None and mean is None:
        return {"tool": "onnxruntime_perf_test", "status": "error", "message": "no latency in its output", "command": cmd}
    return {"tool": "onnxruntime_perf_test", "status": "measured", "median_ms": median if median is not None else mean,
            "mean_ms": mean, "iterations": _int(out, r"Total inference requests:\s*(\d+)"), "command": cmd}


def trtexec(path: Path, fmt: str, shape: tuple[int, ...], seconds: float) -> dict:
    """trtexec on the engine (or the ONNX it builds from, INT8 from its Q/DQ nodes), batch 1, with the input
    copies included (no --noDataTransfers), as the suite's bound call includes them."""
    exe = find_tool("trtexec")
    if exe is None:
        return {"tool": "trtexec", "status": "not installed"}
    # Explicit quantization: --int8 lets TensorRT use the Q/DQ scales of an INT8 ONNX (never calibration).
    source = [f"--loadEngine={path}"] if fmt == "tensorrt" else [f"--onnx={path}", *(["--int8"] if _has_qdq(path) else [])]
    cmd = [exe, *source, f"--duration={max(1, round(seconds))}", "--warmUp=500", "--useSpinWait"]
    name = _input_name(path) if fmt == "onnx" else None
    if name:
        cmd.append(f"--shapes={name}:{'x'.join(str(d) for d in shape)}")
    out, error = _run(cmd, "trtexec")
    if error:
        return error
    # "Latency: min = 0.1 ms, max = 0.3 ms, mean = 0.12 ms, median = 0.11 ms, percentile(90%) = ..."
    m = re.search(r"\] Latency: min = [\d.]+ ms, max = [\d.]+ ms, mean = ([\d.]+) ms, median = ([\d.]+) ms", out)
    if not m:
        return {"tool": "trtexec", "status": "error", "message": "no 'Latency:' summary in its output", "command": cmd}
    return {"tool": "trtexec", "status": "measured", "median_ms": float(m.group(2)), "mean_ms": float(m.group(1)),
            "command": cmd}


def _latency(text: str, label: str) -> Optional[float]:
    """benchmark_app prints '   Median:  38.60 us' (or ms when the mean is 1 ms or more)."""
    m = re.search(rf"{label}:\s+([\d.]+)\s*(us|ms)", text)
    if not m:
        return None
    value = float(m.group(1))
    return value / 1000.0 if m.group(2) == "us" else value


def _seconds(text: str, label: str) -> Optional[float]:
    m = re.search(rf"{label}:\s*([\d.eE+-]+)\s*s\b", text)
    return float(m.group(1)) * 1000.0 if m else None


def _float(text: str, pattern: str) -> Optional[float]:
    m = re.search(pattern, text)
    return float(m.group(1)) if m else None


def _int(text: str, pattern: str) -> Optional[int]:
    m = re.search(pattern, text)
    return int(m.group(1)) if m else None


def _free_dims(path: Path) -> list[str]:
    try:
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
        return sorted({d.dim_param for i in graph.input for d in i.type.tensor_type.shape.dim if d.dim_param})
    except Exception:  # noqa: BLE001 (no onnx package on the device: the tool then uses its defaults)
        return []


def _has_qdq(path: Path) -> bool:
    try:
        import onnx

        return any(n.op_type == "QuantizeLinear" for n in onnx.load(str(path), load_external_data=False).graph.node)
    except Exception:  # noqa: BLE001
        return False


def _input_name(path: Path) -> Optional[str]:
    try:
        import onnx

        return onnx.load(str(path), load_external_data=False).graph.input[0].name
    except Exception:  # noqa: BLE001
        return None


def comparison(suite_p50_ms: float, tool: Optional[dict]) -> Optional[dict]:
    """Our p50 against the tool's median: the ratio, and whether it is within 10 % or 5 us (the larger)."""
    if not tool or tool.get("status") != "measured":
        return None
    median = tool["median_ms"]
    tolerance = max(0.10 * median, 0.005)
    return {"suite_p50_ms": suite_p50_ms, "tool_median_ms": median, "ratio": suite_p50_ms / median if median else None,
            "difference_ms": suite_p50_ms - median, "tolerance_ms": tolerance,
            "agrees": abs(suite_p50_ms - median) <= tolerance}
