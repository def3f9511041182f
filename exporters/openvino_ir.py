"""ONNX -> OpenVINO IR (model.xml + model.bin). The INT8 IR comes from the Q/DQ ONNX, which OpenVINO turns
into its FakeQuantize form and runs with INT8 kernels."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path


def convert_to_ir(onnx_path: Path, xml_path: Path, meta: dict) -> None:
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    for key, value in sorted(meta.items()):
        model.set_rt_info(value if isinstance(value, str) else json.dumps(value, sort_keys=True),
                          ["edgesmith", key])
    with tempfile.TemporaryDirectory() as tmp:
        # save_model compresses weights to FP16 by default: keep FP32 weights (and INT8 scales) exact.
        ov.save_model(model, str(Path(tmp) / "model.xml"), compress_to_fp16=False)
        saved = ov.Core().read_model(str(Path(tmp) / "model.xml"))
    _stable_names(saved)
    ov.serialize(saved, str(xml_path), str(Path(xml_path).with_suffix(".bin")))


# '<Type>_<n>': names OpenVINO invents from a process-wide counter (ONNX export names look like '/conv1/Conv').
AUTO_NAME = re.compile(r"^[A-Z][A-Za-z0-9]*_\d+$")


def _stable_names(model) -> None:
    """Invented names depend on how many models this process converted before, so re-exporting the same
    weights would change the bytes. Name those ops by their position in the graph instead."""
    for index, op in enumerate(model.get_ordered_ops()):
        if AUTO_NAME.match(op.get_friendly_name()):
            op.set_friendly_name(f"{op.get_type_name()}_{index}")


def read_ir_metadata(xml_path: Path) -> dict:
    import openvino as ov

    model = ov.Core().read_model(str(xml_path))
    info = model.get_rt_info()["edgesmith"]
    out = {}
    for key in info.keys():
        raw = info[key].astype(str)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out
