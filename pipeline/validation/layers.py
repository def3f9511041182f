"""Report sections and stage metrics about where time and INT8 error go: the suite's latency beside the
runtime's own tool, the top layers by time per artifact (with kernel and precision, and a stacked bar of
FP32 vs INT8 per layer), and the per-layer quantization error of the bundle's INT8 ONNX against its FP32 ONNX."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..report import Section, esc, figure_html, html_table, md_table, once_per_artifact, passed_runs, pyplot
from .suite import TargetRun
from .targets import timed_label

TOP = 10                 # layers listed per artifact
BAR_LAYERS = 8           # layers drawn separately in the stacked bar (the rest is "other")
ERROR_IMAGES = 256       # eval images the per-layer error is measured on
COLORS = {"int8": "#1f77b4", "fp32": "#ff7f0e", "bf16": "#d62728", "fp16": "#9467bd", "convert": "#9e9e9e"}


def _us(ms: Optional[float]) -> Optional[float]:
    return None if ms is None else ms * 1000.0


def tool_section(runs: list[TargetRun]) -> Optional[Section]:
    points = passed_runs(runs)
    if not points:
        return None
    headers = ["target", "artifact", "runtime", "suite p50 us", "runtime's own p50 us", "tool", "tool median us",
               "ratio", "within 10 % / 5 us"]
    rows = []
    for target, run in points:
        tool, cmp_ = run.get("tool") or {}, run.get("tool_comparison") or {}
        reported = run["latency"].get("runtime_reported", {}).get("p50_ms")
        rows.append([timed_label(target), run["artifact"], run["runtime"], _us(run["latency"]["model"]["p50_ms"]), _us(reported),
                     tool.get("tool", "none"), _us(tool.get("median_ms")) if tool.get("status") == "measured"
                     else tool.get("status", "-"), cmp_.get("ratio"),
                     ("yes" if cmp_.get("agrees") else "NO") if cmp_ else "-"])
    note = ('<p class="note">Suite p50: the bound model call (inputs and outputs pre-allocated, nothing converted) '
            "timed in Python; runtime's own p50: the runtime's timing of the same calls where it reports one "
            "(OpenVINO InferRequest.latency); tool: the runtime's benchmark tool on the same file, threads and batch 1 "
            "(benchmark_app -api sync -nstreams 1 -hint none; onnxruntime_perf_test and trtexec where installed).</p>")
    return Section("Latency: the suite beside the runtime's own tool", html_table(headers, rows, left=3) + note,
                   md_table(headers, rows))


def layer_latency_section(runs: list[TargetRun]) -> Optional[Section]:
    profiled = [r for r in once_per_artifact(passed_runs(runs)) if (r.get("layers") or {}).get("layers")]
    if not profiled:
        return None
    headers = ["artifact (runtime)", "layer", "op", "kernel", "precision", "mean us", "share"]
    rows, float_rows = [], []
    for run in profiled:
        prof = run["layers"]
        for layer in prof["layers"][:TOP]:
            rows.append([f"{run['artifact']} ({run['runtime']})", layer["name"], layer["op"], layer["kernel"],
                         layer["precision"], _us(layer["mean_ms"]), layer["share"]])
        if run.get("precision") == "int8":
            by = prof.get("ms_by_precision", {})
            float_rows.append([f"{run['artifact']} ({run['runtime']})", _us(prof["total_ms"]), _us(by.get("int8", 0.0)),
                               _us(by.get("fp32", 0.0) + by.get("bf16", 0.0) + by.get("fp16", 0.0)),
                               _us(by.get("convert", 0.0)),
                               ", ".join(layer["name"] for layer in prof["layers"]
                                         if layer["precision"] == "fp32" and layer["op"] not in _NOT_COMPUTE)])
    figure = _stacked_bar(profiled)
    float_headers = ["INT8 artifact (runtime)", "profiled total us", "int8 layers us", "float layers us",
                     "quantize/dequantize us", "compute layers that ran in float"]
    note = ('<p class="note">From the runtimes\' own profilers (ONNX Runtime session profiling, OpenVINO performance '
            "counters), averaged over the profiled calls, on the graph as the runtime executed it (after fusion). "
            "Profiling adds its own overhead, so the shares matter more than the absolute times.</p>")
    body = (figure + html_table(headers, rows, left=5) + "<h3>Time an INT8 artifact spends in float</h3>"
            + html_table(float_headers, float_rows) + note)
    md = md_table(headers, rows) + "\n\n" + md_table(float_headers, float_rows)
    return Section("Where the time goes, per layer", body, md)


_NOT_COMPUTE = {"Reorder", "ReorderInput", "ReorderOutput", "Transpose", "Reshape", "Flatten", "Parameter", "Result",
                "Input", "Output", "Constant"}


def _stacked_bar(profiled: list[dict]) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 0.6 * len(profiled) + 1.8))
    labels = []
    for i, run in enumerate(profiled):
        layers = run["layers"]["layers"]
        left = 0.0
        for layer in layers[:BAR_LAYERS]:
            width = layer["mean_ms"] * 1000
            ax.barh(i, width, left=left, color=COLORS.get(layer["precision"], "#bbbbbb"), edgecolor="white")
            if width > 0.06 * max(run["layers"]["total_ms"] * 1000, 1e-9):
                ax.text(left + width / 2, i, layer["op"][:10], ha="center", va="center", fontsize=6, color="white")
            left += width
        rest = max(run["layers"]["total_ms"] * 1000 - left, 0.0)
        ax.barh(i, rest, left=left, color="#dddddd", edgecolor="white")
        labels.append(f"{run['artifact']} ({run['runtime']})")
    ax.set_yticks(range(len(profiled)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("profiled time per call [us], one segment per layer (slowest first), coloured by the precision it ran in")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()] + [plt.Rectangle((0, 0), 1, 1, color="#dddddd")]
    ax.legend(handles, [*COLORS, "other layers"], fontsize=7, loc="lower right")
    ax.grid(alpha=0.3, axis="x")
    return figure_html(fig, "per-layer time, FP32 vs INT8")


def bundle_layer_error(bundle: Path, images: int = ERROR_IMAGES) -> Optional[dict]:
    """SQNR / cosine per layer of the bundle's INT8 ONNX against its FP32 ONNX on the first eval images;
    None when the bundle has no such pair."""
    import numpy as np

    from device_tests.preprocess import Preprocess
    from exporters.artifacts import ArtifactListing
    from quantize.layer_error import onnx_layer_error

    bundle = Path(bundle)
    listing = ArtifactListing.read(bundle)
    fp32, int8 = ((listing.find("onnx", p) or {}).get("file") for p in ("fp32", "int8"))
    if not fp32 or not int8 or not (bundle / "eval.npz").is_file():
        return None
    spec = listing.preprocessing
    with np.load(bundle / "eval.npz") as data:
        raw = data["images_u8"][:images]
    x = Preprocess.from_spec(spec)(raw)
    rows = onnx_layer_error(bundle / fp32, bundle / int8, x)
    return {"fp32": fp32, "int8": int8, "images": int(len(x)), "layers": rows,
            "kept_fp32": [r["layer"] for r in rows if not r["quantized"]]}


def layer_error_section(error: Optional[dict]) -> Optional[Section]:
    if not error or "layers" not in error:
        return None
    headers = ["rank", "layer", "op", "quantized", "SQNR dB", "cosine", "SQNR lost here dB", "max |error|"]
    rows = [[i + 1, r["layer"], r["op"], "yes" if r["quantized"] else "no (float)", r["sqnr_db"], r["cosine"],
             r.get("added_db"), r["max_abs_error"]] for i, r in enumerate(error["layers"])]
    kept = error["kept_fp32"]
    note = (f'<p class="note">{esc(error["int8"])} against {esc(error["fp32"])} on {error["images"]} evaluation images, '
            "each Conv/Gemm output compared (ONNX Runtime without fusions, so every layer output can be read); errors "
            "accumulate along the network, 'SQNR lost here' is the layer's own share. Lowest SQNR first. "
            f"Layers left in float: {esc(', '.join(kept) or 'none')}.</p>")
    return Section("Per-layer quantization error (INT8 vs FP32)", html_table(headers, rows, left=3) + note,
                   md_table(headers, rows) + f"\n\nLayers left in float: {', '.join(kept) or 'none'}.")
