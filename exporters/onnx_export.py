"""PyTorch -> ONNX: FP32 with the legacy exporter... and INT8 as QuantizeLinear/DequantizeLinear pairs.

Both use the TorchScript-based exporter (dynamo=False): the dynamo exporter fails on NNCF's fake-quant
modules, and one exporter for both keeps the FP32 and INT8 graphs alike (same node names, same layout).
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import ExportError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def export_onnx(model: nn.Module, path: Path, example: torch.Tensor, opset: int, dynamic_batch: bool) -> None:
    """One self-contained .onnx file (weights inside), input 'input' N x C x H x W, output 'logits'."""
    import onnx

    buffer = io.BytesIO()
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about constant shapes: expected for CNNs
            torch.onnx.export(model.eval(), (example,), buffer, dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=axes,
                              do_constant_folding=True)
    except torch.onnx.errors.UnsupportedOperatorError as exc:
        raise unsupported_op_error(str(exc), opset) from None
    proto = onnx.load_from_string(buffer.getvalue())
    Path(path).write_bytes(proto.SerializeToString())


def unsupported_op_error(message: str, opset: int) -> ExportError:
    found = re.search(r"operator '([^']+)'", message)
    op = found.group(1) if found else "an operator"
    newer = re.search(r"added in version (\d+)", message)
    fix = (f"Set export.opset to {newer.group(1)} or higher." if newer else
           f"Replace {op} in the student with ops ONNX has (see the ONNX operator list), or leave the format out "
           "of export.formats. If only the INT8 export fails, keep the layer in float with qat.ignored_scope.")
    return ExportError(f"The ONNX exporter cannot export the operator {op} at opset {opset}.", fix)


def fold_weight_quantizers(proto) -> int:
    """Store quantized weights as int8 initializers (Q folded away, DQ kept): the INT8 file gets ~4x smaller
    and runtimes see the canonical 'int8 weight -> DequantizeLinear' pattern. Returns how many were folded."""
    from onnx import numpy_helper

    graph = proto.graph
    _bypass_constant_identities(graph)
    inits = {t.name: t for t in graph.initializer}
    consts = _constant_values(graph)
    uses = _use_counts(graph)
    folded, keep = 0, []
    for node in graph.node:
        weight = node.input[0] if node.input else ""
        if node.op_type == "QuantizeLinear" and weight in inits and uses.get(weight) == 1 and \
                all(name in consts for name in node.input[1:]):
            scale = consts[node.input[1]]
            zero = consts[node.input[2]] if len(node.input) > 2 else np.zeros((), np.uint8)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            quantized = _quantize(numpy_helper.to_array(inits[weight]), scale, zero, axis)
            graph.initializer.remove(inits[weight])
            graph.initializer.append(numpy_helper.from_array(quantized, node.output[0]))
            folded += 1
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    _drop_dead_constants(graph)
    return folded


def _constant_values(graph) -> dict[str, np.ndarray]:
    """Initializers, plus what Constant nodes and Identity-of-a-constant nodes produce (the TorchScript exporter
    deduplicates equal zero-point tensors into one initializer and Identity nodes)."""
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            tensor = next((a.t for a in node.attribute if a.name == "value"), None)
            if tensor is not None:
                values[node.output[0]] = numpy_helper.to_array(tensor)
        elif node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values


def _bypass_constant_identities(graph) -> None:
    """Point readers of Identity(initializer) at the initializer itself (the Identity then dies)."""
    inits = {t.name for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    alias = {n.output[0]: n.input[0] for n in graph.node
             if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in graph_outputs}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]


def _use_counts(graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            counts[name] = counts.get(name, 0) + 1
    for output in graph.output:
        counts[output.name] = counts.get(output.name, 0) + 1
    return counts


def _drop_dead_constants(graph) -> None:
    """Remove Identity/Constant nodes and initializers nothing reads any more (after folding)."""
    while True:
        uses = _use_counts(graph)
        dead = [n for n in graph.node if n.op_type in ("Identity", "Constant") and not any(uses.get(o) for o in n.output)]
        for node in dead:
            graph.node.remove(node)
        if not dead:
            break
    uses = _use_counts(graph)
    for tensor in [t for t in graph.initializer if not uses.get(t.name)]:
        graph.initializer.remove(tensor)


def _quantize(weights: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int) -> np.ndarray:
    """ONNX QuantizeLinear semantics: round half to even, add the zero point, saturate to the zero point's type."""
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * weights.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    info = np.iinfo(zero.dtype)
    values = np.rint(weights / scale) + zero.astype(np.int32)
    return np.clip(values, info.min, info.max).astype(zero.dtype)


def export_onnx_int8(quantized: nn.Module, path: Path, example: torch.Tensor, opset: int,
                     dynamic_batch: bool) -> int:
    """NNCF model -> native torch fake-quant (nncf.strip NATIVE, needs torchao) -> Q/DQ ONNX with int8 weights.
    Exporting without strip would give NNCF's custom FakeQuantize op, which ONNX Runtime rejects."""
    import nncf
    import onnx
    from nncf.parameters import StripFormat

    stripped = nncf.strip(quantized.eval(), do_copy=True, strip_format=StripFormat.NATIVE, example_input=example)
    export_onnx(stripped, path, example, opset, dynamic_batch)
    proto = onnx.load(str(path))
    folded = fold_weight_quantizers(proto)
    Path(path).write_bytes(proto.SerializeToString())
    return folded
