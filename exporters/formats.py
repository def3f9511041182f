"""The export formats, by name. Each takes an ExportJob and returns the artifacts it wrote (as dicts)."""

from __future__ import annotations

import hashlib
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from pipeline.registry import Registry

from .config import ExportConfig
from .errors import ExportError
from .metadata import stamp_onnx, write_sidecar
from .onnx_export import INPUT_NAME, export_onnx, export_onnx_int8
from .parity import onnxruntime_runner, openvino_runner, parity, run_batched, tensorrt_runner

ExportFn = Callable[["ExportJob"], list[dict]]
EXPORT_FORMATS: Registry[ExportFn] = Registry("export format")
# Formats run in this order whatever the config's order: later ones convert the earlier ones' files.
ORDER = ("onnx", "onnx_int8", "openvino", "tensorrt")
FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
PARITY_BATCH = 64


@dataclass
class ExportJob:
    out: Path
    cfg: ExportConfig
    meta: dict                          # shared metadata (class names, input, preprocessing, provenance)
    example: torch.Tensor               # one preprocessed input, 1 x C x H x W
    models: dict[str, nn.Module | None]  # "fp32": the student, "int8": the NNCF model (None without qat)
    parity_inputs: np.ndarray           # float32, preprocessed validation images
    parity_labels: np.ndarray
    log: Callable[[str], None] = print
    _references: dict[str, np.ndarray] = field(default_factory=dict)
    _onnx: dict[str, Path] = field(default_factory=dict)

    def model(self, precision: str, wanted_by: str) -> nn.Module:
        model = self.models.get(precision)
        if model is None:
            raise ExportError(f"Export format '{wanted_by}' needs the INT8 model, but this config has no qat section.",
                              "Add a `qat:` section (even empty: defaults) or remove the format from export.formats.")
        return model

    def reference(self, precision: str) -> np.ndarray:
        """The PyTorch model's logits on the parity images: what every artifact is compared with."""
        if precision not in self._references:
            model = self.model(precision, precision)
            with torch.no_grad():
                self._references[precision] = run_batched(
                    lambda x: model(torch.from_numpy(x)).numpy(), self.parity_inputs, PARITY_BATCH)
        return self._references[precision]

    def onnx(self, precision: str, wanted_by: str) -> Path:
        """model.onnx / model.int8.onnx, exported once whoever asks first."""
        if precision not in self._onnx:
            path = self.out / FILES[precision]
            model = self.model(precision, wanted_by)
            if precision == "int8":
                folded = export_onnx_int8(model, path, self.example, self.cfg.opset, self.cfg.dynamic_batch)
                self.log(f"export: {path.name}: {folded} weight tensors stored as int8")
            else:
                export_onnx(model, path, self.example, self.cfg.opset, self.cfg.dynamic_batch)
            stamp_onnx(path, {**self.meta, "format": "onnx", "precision": precision})
            self._onnx[precision] = path
        return self._onnx[precision]

    def check(self, runner, precision: str) -> dict:
        batch = PARITY_BATCH if self.cfg.dynamic_batch else 1
        return parity(run_batched(runner, self.parity_inputs, batch), self.reference(precision), self.parity_labels)

    def record(self, path: Path, fmt: str, precision: str, runtime: str, checked: dict | None, **extra) -> dict:
        sidecar = write_sidecar(path, {**self.meta, "format": fmt, "precision": precision, **extra})
        return {"file": path.relative_to(self.out).as_posix(), "format": fmt, "precision": precision,
                "runtime": runtime, "sha256": sha256(path), "size": path.stat().st_size,
                "sidecar": sidecar.relative_to(self.out).as_posix(), "parity": checked, **extra}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fused_ops(onnx_path: Path) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime actually runs (after its fusions), e.g. QLinearConv."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        onnxruntime_runner(onnx_path, optimized_copy=str(optimized))
        return dict(sorted(Counter(node.op_type for node in onnx.load(str(optimized)).graph.node).items()))


@EXPORT_FORMATS.register("onnx")
def onnx_fp32(job: ExportJob) -> list[dict]:
    path = job.onnx("fp32", "onnx")
    return [job.record(path, "onnx", "fp32", "onnxruntime", job.check(onnxruntime_runner(path), "fp32"))]


@EXPORT_FORMATS.register("onnx_int8")
def onnx_int8(job: ExportJob) -> list[dict]:
    path = job.onnx("int8", "onnx_int8")
    ops = fused_ops(path)
    int8_convs = ops.get("QLinearConv", 0) + ops.get("ConvInteger", 0)
    fraction = int8_convs / max(int8_convs + ops.get("Conv", 0) + ops.get("FusedConv", 0), 1)
    if fraction < 1:
        # e.g. hard-swish networks: ONNX Runtime keeps DQ -> Conv in float, paying for Q/DQ without INT8 kernels
        job.log(f"export: warning: ONNX Runtime runs only {fraction:.0%} of the convolutions of {path.name} as INT8 "
                "(the rest stay float between Q/DQ pairs); measure before shipping INT8.")
    return [job.record(path, "onnx", "int8", "onnxruntime", job.check(onnxruntime_runner(path), "int8"),
                       onnxruntime_ops=ops, onnxruntime_int8_conv_fraction=round(fraction, 4))]


@EXPORT_FORMATS.register("openvino")
def openvino_ir(job: ExportJob) -> list[dict]:
    from .openvino_ir import convert_to_ir

    folder = job.out / "openvino"
    folder.mkdir(exist_ok=True)
    artifacts = []
    for precision in ("fp32", "int8"):
        if job.models.get(precision) is None:
            job.log("export: no qat section, so no INT8 OpenVINO IR")
            continue
        xml = folder / ("model.xml" if precision == "fp32" else "model.int8.xml")
        convert_to_ir(job.onnx(precision, "openvino"), xml, {**job.meta, "format": "openvino", "precision": precision})
        checked = job.check(openvino_runner(xml, "f32"), precision)
        artifacts.append(job.record(xml, "openvino", precision, "openvino", checked,
                                    weights=xml.with_suffix(".bin").relative_to(job.out).as_posix(),
                                    weights_sha256=sha256(xml.with_suffix(".bin")),
                                    runtime_options={"INFERENCE_PRECISION_HINT": "f32"}))
    return artifacts


@EXPORT_FORMATS.register("tensorrt")
def tensorrt_engine(job: ExportJob) -> list[dict]:
    from .tensorrt import availability, build_here, build_options, write_build_kit

    precision = job.cfg.tensorrt.precision
    onnx_precision = "int8" if precision == "int8" else "fp32"  # fp16 engines are built from the FP32 ONNX
    # The device builds from the ONNX, so it ships and is checked even when its own format was not asked for.
    source_format = "onnx_int8" if precision == "int8" else "onnx"
    shipped = [] if source_format in job.cfg.formats else EXPORT_FORMATS.get(source_format)(job)
    onnx_path = job.onnx(onnx_precision, "tensorrt")
    options = build_options(job.cfg.tensorrt, onnx_path.name, INPUT_NAME, tuple(job.example.shape[1:]))
    folder = job.out / "tensorrt"
    script, *_ = write_build_kit(folder, options)
    can_build, reason = availability()
    extra = {"source_onnx": onnx_path.name, "build_options": options}
    if not can_build:
        job.log(f"export: TensorRT engine to be built on the device ({reason}): tensorrt/{script.name}")
        # Not format "tensorrt": device runners would try to load the script as an engine.
        return shipped + [job.record(script, "tensorrt_build", precision, "tensorrt", None,
                                     engine="build on device", reason=reason, **extra)]
    engine = build_here(folder)
    checked = job.check(tensorrt_runner(engine, INPUT_NAME), onnx_precision)
    return shipped + [job.record(engine, "tensorrt", precision, "tensorrt", checked, engine="built here (this GPU only)",
                       build_script=script.relative_to(job.out).as_posix(), **extra)]


def check_format_names(names: list[str]) -> None:
    for name in names:
        EXPORT_FORMATS.get(name)  # raises ConfigError with did-you-mean and the valid names


def in_order(names: list[str]) -> list[str]:
    return sorted(names, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))
