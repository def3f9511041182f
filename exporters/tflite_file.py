"""Reading and stamping .tflite flatbuffers (no torch): edgesmith's metadata goes into the model's own `metadata`
table (name "edgesmith", a buffer holding sorted-key JSON), as TFLite's metadata writers do, so the file carries
its class names and preprocessing like the ONNX files do. Also: the builtin ops a model uses."""

from __future__ import annotations

import json
from pathlib import Path

METADATA_NAME = "edgesmith"


def _schema():
    from ai_edge_litert import schema_py_generated

    return schema_py_generated


def _utils():
    from ai_edge_litert.tools import flatbuffer_utils

    return flatbuffer_utils


def stamp_tflite(path: Path, meta: dict) -> None:
    """Replace the edgesmith metadata entry and write the model back in place."""
    schema, utils = _schema(), _utils()
    model = utils.read_model_from_bytearray(bytearray(Path(path).read_bytes()))
    model.metadata = [m for m in (model.metadata or []) if _name(m) != METADATA_NAME]
    buffer = schema.BufferT()
    buffer.data = list(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = METADATA_NAME
    entry.buffer = len(model.buffers) - 1
    model.metadata.append(entry)
    Path(path).write_bytes(bytes(utils.convert_object_to_bytearray(model)))


def read_tflite_metadata(path: Path) -> dict:
    model = _utils().read_model_from_bytearray(bytearray(Path(path).read_bytes()))
    for entry in model.metadata or []:
        if _name(entry) == METADATA_NAME:
            return json.loads(bytes(model.buffers[entry.buffer].data).decode())
    return {}


def builtin_ops(path: Path) -> list[str]:
    """Names of the builtin operators the model uses (e.g. CONV_2D), in the file's order."""
    schema, utils = _schema(), _utils()
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    model = utils.read_model_from_bytearray(bytearray(Path(path).read_bytes()))
    used = {op.opcodeIndex for graph in model.subgraphs for op in graph.operators}
    codes = [utils.get_builtin_code_from_operator_code(code) for i, code in enumerate(model.operatorCodes) if i in used]
    return [names.get(c, f"BUILTIN_{c}") for c in codes]


def io_quantization(path: Path) -> dict:
    """dtype, scale and zero-point of the first input and output (scale 0: float)."""
    schema = _schema()
    model = _utils().read_model_from_bytearray(bytearray(Path(path).read_bytes()))
    graph = model.subgraphs[0]
    types = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}

    def describe(index: int) -> dict:
        tensor = graph.tensors[index]
        q = tensor.quantization
        scale = float(q.scale[0]) if q is not None and q.scale is not None and len(q.scale) else 0.0
        zero = int(q.zeroPoint[0]) if q is not None and q.zeroPoint is not None and len(q.zeroPoint) else 0
        return {"dtype": types.get(tensor.type, str(tensor.type)), "scale": scale, "zero_point": zero,
                "shape": [int(d) for d in tensor.shape]}

    return {"input": describe(graph.inputs[0]), "output": describe(graph.outputs[0])}


def _name(entry) -> str:
    name = entry.name
    return name.decode() if isinstance(name, bytes) else str(name)
