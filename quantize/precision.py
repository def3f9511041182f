"""Which layers stay in float: `qat.keep_fp32` (names or auto) and `qat.mode: ptq_accuracy_control`.

Layers are named by their torch module (features.0.0, head.1): the names of the per-layer error table
(quantize.layer_error) and of the ONNX nodes edgesmith exports ('/features/features.0/features.0.0/Conv').
NNCF's torch graph names the same layer 'features/0/0/conv2d/0'; `nncf_scope` translates.

Accuracy control: NNCF's quantize_with_accuracy_control works on OpenVINO and ONNX models only (not torch),
so the float student is exported to ONNX, NNCF quantizes that ONNX with accuracy control (it reverts the
layers that hurt validation accuracy most to float until the drop is within max_drop), and the layers it
reverted are then left in float in the torch PTQ model that the export stage turns into every artifact. The
drop of that torch model is measured on the same validation set; over max_drop, the build fails."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.errors import ConfigError

from .config import IgnoredScopeConfig
from .errors import QuantizationError

COMPUTE_MODULES = (nn.Conv2d, nn.Linear, nn.Conv1d)
ERROR_IMAGES = 128       # calibration images the per-layer error is measured on
REPAIR_STEPS = 5         # accuracy control: more layers kept in float, one at a time, if the torch model misses
NNCF_COMPUTE_TYPES = ("conv2d", "linear", "conv1d", "conv_transpose2d", "addmm", "matmul")


def compute_layers(model: nn.Module) -> list[str]:
    """The layers that can be quantized (Conv / Linear modules), in definition order."""
    return [name for name, m in model.named_modules() if isinstance(m, COMPUTE_MODULES)]


def check_layer_names(model: nn.Module, names: list[str]) -> None:
    valid = compute_layers(model)
    unknown = [n for n in names if n not in valid]
    if unknown:
        from pipeline.registry import did_you_mean

        raise ConfigError(
            f"qat.keep_fp32 names {', '.join(repr(n) for n in unknown)}, which {'is' if len(unknown) == 1 else 'are'} "
            f"not a Conv or Linear layer of this student.{did_you_mean(unknown[0], valid)}",
            f"Use layer names of this model ({', '.join(valid)}), or [auto] to keep the layers with the largest "
            "quantization error (qat.keep_fp32_count of them).")


def nncf_scope(model: nn.Module, example: torch.Tensor, layers: list[str],
               base: IgnoredScopeConfig | None = None) -> IgnoredScopeConfig:
    """An ignored scope that leaves `layers` (module names) in float, merged with the configured one.

    Why the whole op and not only its weight quantizer: ONNX Runtime re-quantizes a float-weight Conv that sits
    between DequantizeLinear and QuantizeLinear (its WeightBiasQuantization transformer), so a layer only
    counts as float in the artifact if its input is not quantized. The price is the layer that produces that
    input: its output is no longer quantized and ONNX Runtime runs it in float too (OpenVINO likewise keeps it
    in float). Every other layer keeps its Q/DQ pairs and is still fused into an integer kernel."""
    from .nncf_ops import graph_nodes

    base = base or IgnoredScopeConfig()
    if not layers:
        return base
    nodes = [name for name, op in graph_nodes(model, example) if op in NNCF_COMPUTE_TYPES]
    names = list(base.names)
    for layer in layers:
        prefix = layer.replace(".", "/") + "/"
        match = [n for n in nodes if n.startswith(prefix) and n.count("/") == prefix.count("/") + 1]
        if not match:
            raise QuantizationError(f"NNCF's graph has no node for layer {layer}.",
                                    "Name the layer in qat.ignored_scope.names with its NNCF node name instead.")
        names += [n for n in match if n not in names]
    return IgnoredScopeConfig(names=names, types=list(base.types), patterns=list(base.patterns))


def auto_keep(layer_error: list[dict], count: int) -> list[str]:
    """The `count` quantized layers that lose the most SQNR themselves (added_db), worst first."""
    quantized = [r for r in layer_error if r.get("quantized", True)]
    quantized.sort(key=lambda r: -r.get("added_db", -r["sqnr_db"]))
    return [r["layer"] for r in quantized[:count]]


@dataclass
class AccuracyControlResult:
    reverted: list[str]               # layers NNCF returned to float (module names)
    onnx_fp32_acc: float              # NNCF's validation of the FP32 ONNX
    onnx_int8_acc: float              # ... and of its accuracy-controlled INT8 ONNX
    quantized_ops: int                # compute layers NNCF quantized before reverting any
    log: list[str] = field(default_factory=list)


def accuracy_controlled_layers(model: nn.Module, example: torch.Tensor, calibration: list[torch.Tensor],
                               val_images: torch.Tensor, val_labels: np.ndarray, max_drop: float, preset: str,
                               opset: int = 17) -> AccuracyControlResult:
    """Run NNCF's quantize_with_accuracy_control on the ONNX export of `model` (BatchNorm already folded) and
    return the layers it kept in float. `val_images` preprocessed; accuracy is top-1 over `val_labels`."""
    import nncf
    import onnx
    import onnxruntime as ort

    from exporters.onnx_export import INPUT_NAME, export_onnx

    with tempfile.TemporaryDirectory(prefix="edgesmith-aac-") as tmp:
        path = Path(tmp) / "float.onnx"
        export_onnx(model.eval(), path, example, opset, dynamic_batch=True)
        proto = onnx.load(str(path))
    x_val = val_images.numpy().astype(np.float32)
    batches = [(x_val[i:i + 256], val_labels[i:i + 256]) for i in range(0, len(x_val), 256)]

    def validate(candidate, items) -> float:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        session = ort.InferenceSession(candidate.SerializeToString(), options, providers=["CPUExecutionProvider"])
        hits = total = 0
        for images, labels in items:
            hits += int((session.run(None, {INPUT_NAME: images})[0].argmax(1) == labels).sum())
            total += len(labels)
        return hits / max(total, 1)

    calib = nncf.Dataset([c.numpy().astype(np.float32) for c in calibration], lambda x: {INPUT_NAME: x})
    try:
        quantized = nncf.quantize_with_accuracy_control(
            proto, calib, nncf.Dataset(batches), validate, max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE,
            preset=nncf.QuantizationPreset(preset), subset_size=len(calibration))
    except (nncf.UnsupportedModelError, nncf.InternalError, NotImplementedError, RuntimeError) as exc:
        raise QuantizationError(
            f"NNCF's accuracy control failed on the ONNX export of the student: {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0]}", "Use qat.mode: ptq or qat (with qat.keep_fp32 for layers to keep "
            "in float).") from exc
    from .layer_error import _producers, compute_nodes, layer_name, node_is_quantized

    producers = _producers(quantized.graph)
    nodes = compute_nodes(quantized.graph)
    modules = {name for name, _ in model.named_modules()}
    reverted = [layer_name(n.name, modules) for n in nodes if not node_is_quantized(n, producers)]
    return AccuracyControlResult(reverted=reverted, onnx_fp32_acc=validate(proto, batches),
                                 onnx_int8_acc=validate(quantized, batches), quantized_ops=len(nodes))


def _accuracy(model: nn.Module, images: torch.Tensor, labels: np.ndarray, batch: int = 256) -> float:
    with torch.no_grad():
        model.eval()
        pred = torch.cat([model(images[i:i + batch]).argmax(1) for i in range(0, len(images), batch)]).numpy()
    return float((pred == np.asarray(labels)).mean())


def quantize_student(float_model: nn.Module, calibration: list[torch.Tensor], val_images: torch.Tensor,
                     val_labels: np.ndarray, cfg, fp32_val_acc: float | None = None, log=print) -> tuple[nn.Module, dict]:
    """NNCF PTQ of `float_model` (BatchNorm folded) with the layers that stay in float left out: the configured
    ones (cfg.keep_fp32), the worst by per-layer error (keep_fp32: [auto]) or those accuracy control reverts
    (cfg.mode ptq_accuracy_control, whose result is then held to cfg.max_drop on `val_images`). Returns the
    NNCF model and what was decided (kept_fp32, quantized_layers, accuracy_control, ...)."""
    from .layer_error import torch_layer_error
    from .nncf_ops import quantize_ptq

    example = calibration[0]
    errors_on = torch.cat(calibration[:ERROR_IMAGES])
    auto = cfg.keep_fp32 == ["auto"]
    keep = [] if auto else list(cfg.keep_fp32)
    check_layer_names(float_model, keep)
    info: dict = {}

    def ptq(layers):
        return quantize_ptq(float_model, calibration, cfg.preset, nncf_scope(float_model, example, layers, cfg.ignored_scope))

    if cfg.mode == "ptq_accuracy_control":
        result = accuracy_controlled_layers(float_model, example, calibration, val_images, val_labels,
                                            cfg.max_drop, cfg.preset)
        keep += [layer for layer in result.reverted if layer not in keep]
        info["accuracy_control"] = {"max_drop": cfg.max_drop, "reverted_by_nncf": result.reverted,
                                    "onnx_fp32_val_acc": result.onnx_fp32_acc, "onnx_int8_val_acc": result.onnx_int8_acc}
        log(f"qat: accuracy control (NNCF on the ONNX export): {len(result.reverted)} layer(s) back to float "
            f"({', '.join(result.reverted) or 'none'}); ONNX val {result.onnx_fp32_acc:.4f} -> {result.onnx_int8_acc:.4f}")
    model = ptq(keep)
    if auto:
        ranking = torch_layer_error(float_model, model, errors_on)
        keep = auto_keep(ranking, cfg.keep_fp32_count)
        info["keep_fp32_auto_ranking"] = [{k: r[k] for k in ("layer", "sqnr_db", "added_db") if k in r} for r in ranking]
        model = ptq(keep)
    if cfg.mode == "ptq_accuracy_control":
        fp32 = _accuracy(float_model, val_images, val_labels) if fp32_val_acc is None else fp32_val_acc
        model, keep = _enforce_drop(float_model, model, keep, ptq, val_images, val_labels, fp32, cfg.max_drop,
                                    errors_on, info, log)
    info["kept_fp32"] = keep
    info["quantized_layers"] = [n for n in compute_layers(float_model) if n not in keep]
    if keep:
        log(f"qat: kept in float: {', '.join(keep)}")
    return model, info


def _enforce_drop(float_model, model, keep, ptq, val_images, val_labels, fp32: float, max_drop: float, errors_on,
                  info: dict, log):
    """The torch model is what gets exported: its validation drop must be within max_drop. If it is not (its
    calibration differs slightly from the ONNX one NNCF judged), keep the next-worst layer in float, up to
    REPAIR_STEPS times; still over: the build fails with the measured drop."""
    from .layer_error import torch_layer_error

    for step in range(REPAIR_STEPS + 1):
        drop = fp32 - _accuracy(model, val_images, val_labels)
        info["accuracy_control"].update(fp32_val_acc=fp32, measured_drop=drop, repair_steps=step)
        if drop <= max_drop + 1e-12:
            return model, keep
        remaining = [r for r in torch_layer_error(float_model, model, errors_on) if r["quantized"] and r["layer"] not in keep]
        if step == REPAIR_STEPS or not remaining:
            break
        keep = keep + auto_keep(remaining, 1)
        log(f"qat: validation drop {drop:.4f} > max_drop {max_drop}: also keeping {keep[-1]} in float")
        model = ptq(keep)
    raise QuantizationError(
        f"Accuracy control could not meet qat.max_drop {max_drop:.4f}: the INT8 model's measured validation accuracy "
        f"drop is {drop:.4f} (FP32 {fp32:.4f}) with {len(keep)} layer(s) kept in float ({', '.join(keep) or 'none'}).",
        "Allow a larger qat.max_drop, use qat.mode: qat (fine-tuning recovers accuracy), or calibrate on more images "
        "(qat.calibration_size).")
