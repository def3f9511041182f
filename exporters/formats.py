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
EXPORT_FORMATS: Registry[ExportFn] = Registry("export format")  # one function per exporters.config.FORMATS name
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
    # the qat stage's calibration images (1 x C x H x W each), for the PT2E INT8 of the mobile formats
    calibration: list[torch.Tensor] = field(default_factory=list)
    _references: dict[str, np.ndarray] = field(default_factory=dict)
    _onnx: dict[str, Path] = field(default_factory=dict)
    _files: dict[str, Path] = field(default_factory=dict)

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

    def once(self, name: str, make: Callable[[], Path]) -> Path:
        """A file several formats share (the INT8 .tflite of litert and tflm), written once."""
        if name not in self._files:
            self._files[name] = make()
        return self._files[name]

    def check(self, runner, precision: str, batch: int | None = None) -> dict:
        batch = batch or (PARITY_BATCH if self.cfg.dynamic_batch else 1)
        return parity(run_batched(runner, self.parity_inputs, batch), self.reference(precision), self.parity_labels)

    def record(self, path: Path, fmt: str, precision: str, runtime: str, checked: dict | None, **extra) -> dict:
        sidecar = write_sidecar(path, with_file_input({**self.meta, "format": fmt, "precision": precision, **extra}))
        return {"file": path.relative_to(self.out).as_posix(), "format": fmt, "precision": precision,
                "runtime": runtime, "sha256": sha256(path), "size": path.stat().st_size,
                "sidecar": sidecar.relative_to(self.out).as_posix(), "parity": checked, **extra}


def with_file_input(meta: dict) -> dict:
    """A .tflite's metadata (it carries "io"): its "input" is the tensor the file takes, e.g. int8 at batch 1 for
    an INT8 model, not the float32 tensor of dynamic batch that the preprocessing yields (ONNX, OpenVINO)."""
    if "io" not in meta:
        return meta
    real = meta["io"]["input"]
    return {**meta, "input": {**meta.get("input", {}), "dtype": real["dtype"], "shape": real["shape"]}}


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


# -- phones and microcontrollers (the `mobile` extra; exporters/mobile.py) --------------------------------------

MOBILE_FILES = {"litert": {"fp32": "model.tflite", "int8": "model.int8.tflite"},
                "executorch": {"fp32": "model.pte", "int8": "model.int8.pte"}}


def device_runner(path: Path, runtime: str, fmt: str):
    """The device suite's own runner as a parity callable (active for the life of the closure)."""
    from device_tests.runners import get_runner

    runner = get_runner(runtime)(path, fmt, threads=0)
    runner.activate()
    return runner.infer


def litert_file(job: ExportJob, precision: str, wanted_by: str) -> Path:
    from .mobile import litert_convert, require

    def make() -> Path:
        require(wanted_by)
        path = job.out / MOBILE_FILES["litert"][precision]
        job.model(precision, wanted_by)  # INT8 needs the qat section (and its calibration images)
        litert_convert(job.models["fp32"], job.example, path, job.calibration if precision == "int8" else None)
        return path
    return job.once(f"litert-{precision}", make)


def _mobile_extra(job: ExportJob, precision: str) -> dict:
    """What the INT8 mobile artifacts share: how they were quantized, and how far from NNCF's INT8 model."""
    if precision != "int8":
        return {}
    return {"quantization": {"method": "PT2E post-training, INT8 symmetric, per-channel weights",
                             "calibration_images": len(job.calibration),
                             "calibration": "the qat stage's calibration images (qat.calibration_size, same seed)",
                             "qat_ranges": "not carried over (NNCF's quantizers are not PT2E nodes)"}}


def _vs_nncf(job: ExportJob, checked: dict) -> dict:
    """Accuracy on the parity images relative to the NNCF INT8 model (the ONNX INT8's reference)."""
    nncf = float((job.reference("int8").argmax(1) == job.parity_labels).mean())
    return {**checked, "nncf_int8_accuracy": nncf, "accuracy_minus_nncf_int8": checked["accuracy"] - nncf}


@EXPORT_FORMATS.register("litert")
def litert(job: ExportJob) -> list[dict]:
    from .tflite_file import io_quantization, stamp_tflite

    artifacts = []
    for precision in ("fp32", "int8"):
        if job.models.get(precision) is None:
            job.log("export: no qat section, so no INT8 LiteRT model")
            continue
        path = litert_file(job, precision, "litert")
        stamp_tflite(path, with_file_input({**job.meta, "format": "litert", "precision": precision,
                                            "io": io_quantization(path)}))
        # FP32 is compared with the FP32 student; INT8 too (PT2E quantizes the FP32 student), and with NNCF's
        checked = job.check(device_runner(path, "litert", "litert"), "fp32", batch=1)
        if precision == "int8":
            checked = _vs_nncf(job, checked)
        artifacts.append(job.record(path, "litert", precision, "litert", checked, io=io_quantization(path),
                                    **_mobile_extra(job, precision)))
    return artifacts


@EXPORT_FORMATS.register("tflm")
def tflm(job: ExportJob) -> list[dict]:
    import shutil

    from .mobile import require
    from .tflite_file import builtin_ops, io_quantization, stamp_tflite
    from .tflm import smallest_arena, write_c_sources

    require("tflm")
    source = litert_file(job, "int8", "tflm")
    folder = job.out / "tflm"
    folder.mkdir(exist_ok=True)
    path = folder / "model.int8.tflite"
    shutil.copyfile(source, path)
    io, ops = io_quantization(path), builtin_ops(path)
    stamp_tflite(path, with_file_input({**job.meta, "format": "tflm", "precision": "int8", "io": io, "ops": ops}))
    arena = smallest_arena(path)
    arena_constant = arena["arena_min_bytes"] + 1024
    header, c_source = write_c_sources(folder, path.read_bytes(), arena_constant, ops, io)
    checked = _vs_nncf(job, job.check(device_runner(path, "tflm", "tflm"), "fp32", batch=1))
    job.log(f"export: tflm: arena {arena['arena_min_bytes'] / 1024:.1f} KiB needed "
            f"({arena['arena_used_bytes'] / 1024:.1f} KiB recorded), flash {path.stat().st_size / 1024:.1f} KiB, "
            f"ops {', '.join(ops)}")
    return [job.record(path, "tflm", "int8", "tflm", checked, io=io, ops=ops, arena_bytes=arena_constant, **arena,
                       c_source=c_source.relative_to(job.out).as_posix(), c_header=header.relative_to(job.out).as_posix(),
                       c_source_sha256=sha256(c_source), c_header_sha256=sha256(header), **_mobile_extra(job, "int8"))]


@EXPORT_FORMATS.register("ethos_u")
def ethos_u(job: ExportJob) -> list[dict]:
    """Vela's compilation of the INT8 .tflite per NPU target (exporters/ethos_u.py); no parity: it runs on the NPU."""
    from .ethos_u import VELA_MODEL, compile_target, log_line, write_ini
    from .mobile import require
    from .tflite_file import io_quantization

    require("ethos_u")
    cfg = job.cfg.ethos_u
    ini = write_ini(cfg, job.out / "ethos_u")
    source = litert_file(job, "int8", "ethos_u")
    io = io_quantization(source)
    artifacts = []
    for target in cfg.targets:
        folder = job.out / "ethos_u" / target.folder
        extra = compile_target(source, folder, target, cfg, ini, io)
        job.log(log_line(target.folder, extra["npu"]))
        path = folder / VELA_MODEL
        artifacts.append(job.record(path, "ethos_u", "int8", "ethos_u", None, **extra,
                                    c_source_sha256=sha256(job.out / extra["c_source"]),
                                    c_header_sha256=sha256(job.out / extra["c_header"]),
                                    **_mobile_extra(job, "int8")))
    return artifacts


@EXPORT_FORMATS.register("executorch")
def executorch(job: ExportJob) -> list[dict]:
    from .mobile import executorch_convert, require

    require("executorch")
    artifacts = []
    for precision in ("fp32", "int8"):
        if job.models.get(precision) is None:
            job.log("export: no qat section, so no INT8 ExecuTorch program")
            continue
        path = job.out / MOBILE_FILES["executorch"][precision]
        lowering = executorch_convert(job.models["fp32"], job.example, path,
                                      job.calibration if precision == "int8" else None)
        if lowering["ops_outside_xnnpack"]:
            job.log(f"export: {path.name}: ops left outside XNNPACK (portable kernels): "
                    f"{', '.join(lowering['ops_outside_xnnpack'])}")
        checked = job.check(device_runner(path, "executorch", "executorch"), "fp32", batch=1)
        if precision == "int8":
            checked = _vs_nncf(job, checked)
        artifacts.append(job.record(path, "executorch", precision, "executorch", checked, delegate="XNNPACK",
                                    **lowering, **_mobile_extra(job, precision)))
    return artifacts


def check_format_names(names: list[str]) -> None:
    for name in names:
        EXPORT_FORMATS.get(name)  # raises ConfigError with did-you-mean and the valid names

