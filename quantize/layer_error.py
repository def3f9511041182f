"""Per-layer quantization error: each quantized layer's output in the INT8 model against the same layer's
output in the FP32 model, on the same images, as SQNR (dB, higher is better: 10 log10 of signal power over
error power) and cosine similarity, worst first. The errors accumulate along the network (a layer sees its
inputs already perturbed, as in deployment); `added_db` is the SQNR lost at the layer itself (its input's
SQNR minus its output's), which is what keep_fp32: auto ranks by.

Two sources of the same table:
- `torch_layer_error(float_model, quantized_model, images)`: the NNCF fake-quantized model vs its float model
  (the qat stage, on calibration images), layers named by their module (features.0.0);
- `onnx_layer_error(fp32.onnx, int8.onnx, images)`: any FP32 / INT8 Q/DQ ONNX pair (`edgesmith profile
  --compare`, the validation report), layers matched by node name (edgesmith's exports share them) or else
  by their order, executed in ONNX Runtime without graph fusions so every layer output can be read."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Collection, Iterable, Optional, Sequence

import numpy as np

COMPUTE_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    ref = np.asarray(reference, np.float64).ravel()
    noise = float(np.sum((ref - np.asarray(test, np.float64).ravel()) ** 2))
    signal = float(np.sum(ref ** 2))
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def cosine(reference: np.ndarray, test: np.ndarray) -> float:
    a, b = np.asarray(reference, np.float64).ravel(), np.asarray(test, np.float64).ravel()
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / norm) if norm > 0 else (1.0 if not a.any() and not b.any() else 0.0)


def rank(rows: list[dict]) -> list[dict]:
    """Worst (lowest SQNR) first; layers left in float at the end."""
    return sorted(rows, key=lambda r: (not r.get("quantized", True), r["sqnr_db"]))


def _row(layer: str, op: str, quantized: bool, ref: np.ndarray, test: np.ndarray, ref_in=None, test_in=None) -> dict:
    row = {"layer": layer, "op": op, "quantized": bool(quantized), "sqnr_db": _finite(sqnr_db(ref, test)),
           "cosine": cosine(ref, test), "max_abs_error": float(np.max(np.abs(ref - test))) if ref.size else 0.0}
    if ref_in is not None:
        row["input_sqnr_db"] = _finite(sqnr_db(ref_in, test_in))
        row["added_db"] = row["input_sqnr_db"] - row["sqnr_db"]
    return row


def _finite(v: float) -> float:
    """JSON has no infinity: identical outputs are reported as 200 dB."""
    return max(min(v, 200.0), -200.0)


# -- torch: the NNCF model against its float model -------------------------------------------------------

def torch_layer_error(float_model, quantized_model, images, batch_size: int = 64) -> list[dict]:
    """`images`: preprocessed float tensor N x C x H x W. Layers: every Conv/Linear module of the float model,
    found under the same name in the quantized one; `quantized` is False for the ones NNCF left in float."""
    import torch
    from torch import nn

    layers = [name for name, m in float_model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Conv1d))]
    quantized_names = quantized_layers(quantized_model)

    def collect(model) -> dict[str, tuple[list, list]]:
        store: dict[str, tuple[list, list]] = {n: ([], []) for n in layers}
        modules = dict(model.named_modules())
        def hook(name):
            def record(module, inputs, output) -> None:   # returns None: the output is left as it is
                store[name][0].append(inputs[0].detach().float())
                store[name][1].append(output.detach().float())
            return record

        handles = [modules[n].register_forward_hook(hook(n)) for n in layers if n in modules]
        try:
            with torch.no_grad():
                model.eval()
                for start in range(0, len(images), batch_size):
                    model(images[start:start + batch_size])
        finally:
            for h in handles:
                h.remove()
        return store

    ref, test = collect(float_model), collect(quantized_model)
    rows = []
    for name in layers:
        if not ref[name][1] or not test[name][1]:
            continue
        r_in, r_out = torch.cat(ref[name][0]).numpy(), torch.cat(ref[name][1]).numpy()
        t_in, t_out = torch.cat(test[name][0]).numpy(), torch.cat(test[name][1]).numpy()
        op = type(dict(float_model.named_modules())[name]).__name__
        rows.append(_row(name, op, name in quantized_names, r_out, t_out, r_in, t_in))
    return rank(rows)


def quantized_layers(quantized_model) -> set[str]:
    """Module names whose weight NNCF quantizes. NNCF 3 keeps its quantizers as hook modules named after the op
    they quantize: a weight quantizer of module features.0.0 is the pre-hook 'pre_hooks.features/0/0/conv2d/0__1'."""
    from torch import nn

    hooks = " ".join(name for name, _ in quantized_model.named_modules() if "pre_hooks" in name)
    return {name for name, m in quantized_model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.Conv1d)) and f"pre_hooks.{name.replace('.', '/')}/" in hooks}


# -- ONNX: any FP32 / INT8 pair ---------------------------------------------------------------------------

def layer_name(node_name: str, modules: Optional[Collection[str]] = None) -> str:
    """The torch module an exported ONNX node came from: '/features/features.0/features.0.0/Conv' ->
    'features.0.0'. Each scope part of the exporter's name is relative to one of the enclosing modules (a timm
    model in a wrapper: '/model/conv_stem/Conv' is model.conv_stem, '/model/blocks/blocks.0/...' model.blocks.0),
    so with `modules` (the model's named_modules() names) each part is resolved against the closest enclosing
    module that makes it a real one; without, the last scope part is taken as is."""
    parts = [p for p in node_name.split("/") if p][:-1]
    if not parts:
        return node_name
    if modules is None:
        return parts[-1]
    enclosing = [""]
    for part in parts:
        candidates = (f"{outer}.{part}".lstrip(".") for outer in reversed(enclosing))
        resolved = next((name for name in candidates if name in modules), None)
        if resolved is None:
            return parts[-1]
        enclosing.append(resolved)
    return enclosing[-1]


def compute_nodes(graph) -> list:
    return [n for n in graph.node if n.op_type in COMPUTE_OPS]


def _producers(graph) -> dict[str, object]:
    return {out: n for n in graph.node for out in n.output}


def node_is_quantized(node, producers: dict) -> bool:
    """A compute node runs quantized when its weight (input 1) comes out of a DequantizeLinear."""
    src = producers.get(node.input[1]) if len(node.input) > 1 else None
    while src is not None and src.op_type in ("Reshape", "Transpose", "Identity", "Unsqueeze"):
        src = producers.get(src.input[0])
    return src is not None and src.op_type == "DequantizeLinear"


def match_layers(fp32_graph, int8_graph) -> list[tuple[str, object, object]]:
    """(layer, fp32 node, int8 node): by node name where the two graphs share them, else by order."""
    a, b = compute_nodes(fp32_graph), compute_nodes(int8_graph)
    by_name = {n.name: n for n in b}
    if a and all(n.name in by_name for n in a):
        return [(layer_name(n.name), n, by_name[n.name]) for n in a]
    if len(a) != len(b):
        from .errors import QuantizationError

        raise QuantizationError(
            f"The FP32 and INT8 models do not have the same layers ({len(a)} vs {len(b)} Conv/Gemm/MatMul nodes, "
            "and their names differ).",
            "Compare an INT8 model with the FP32 model it was quantized from.")
    return [(layer_name(x.name) or f"layer{i}", x, y) for i, (x, y) in enumerate(zip(a, b))]


def _run_with_outputs(path: Path, names: Sequence[str], inputs: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    existing = {o.name for o in model.graph.output}
    graph_inputs = {i.name for i in model.graph.input}
    given = {n: inputs for n in names if n in graph_inputs}
    names = [n for n in names if n not in graph_inputs]
    for name in names:
        if name not in existing:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    fixed = session.get_inputs()[0].shape[0]
    step = fixed if isinstance(fixed, int) and fixed > 0 else batch_size
    parts: dict[str, list] = {n: [] for n in names}
    for start in range(0, len(inputs), step):
        chunk = inputs[start:start + step]
        if len(chunk) < step and isinstance(fixed, int):
            break
        for name, value in zip(names, session.run(list(names), {input_name: chunk})):
            parts[name].append(value)
    return {**{n: v[:sum(len(p) for p in parts[names[0]])] if names else v for n, v in given.items()},
            **{n: np.concatenate(v) for n, v in parts.items()}}


def onnx_layer_error(fp32_path: Path, int8_path: Path, inputs: np.ndarray, batch_size: int = 64) -> list[dict]:
    """`inputs`: preprocessed float32 N x C x H x W."""
    import onnx

    g32 = onnx.load(str(fp32_path), load_external_data=False).graph
    g8 = onnx.load(str(int8_path), load_external_data=False).graph
    pairs = match_layers(g32, g8)
    producers = _producers(g8)
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    ref = _run_with_outputs(fp32_path, _io_names(pairs, 1), inputs, batch_size)
    test = _run_with_outputs(int8_path, _io_names(pairs, 2), inputs, batch_size)
    rows = []
    for layer, a, b in pairs:
        rows.append(_row(layer, a.op_type, node_is_quantized(b, producers), ref[a.output[0]], test[b.output[0]],
                         ref.get(a.input[0]), test.get(b.input[0])))
    return rank(rows)


def _io_names(pairs: Iterable[tuple], which: int) -> list[str]:
    names: list[str] = []
    for pair in pairs:
        node = pair[which]
        for name in (node.input[0], node.output[0]):
            if name not in names:
                names.append(name)
    return names
