"""PyTorch -> LiteRT (.tflite, litert-torch) and ExecuTorch (.pte, XNNPACK). Both INT8 paths are PT2E: the FP32
student is exported with torch.export, observers are inserted by the backend's quantizer (litert-torch's
PT2EQuantizer, ExecuTorch's XNNPACKQuantizer: INT8 symmetric, per-channel weights), calibrated on the very images
the qat stage calibrated NNCF with (qat.calibration_size, same seed), converted, lowered. Both converters map PT2E's
quantize/dequantize nodes to int8 kernels; NNCF's QAT model carries its learned ranges in NNCF's own quantizer
modules instead, and handing those to the converters was not attempted: the QAT-learned ranges do not carry over.
Each INT8 artifact's parity record says how far it is from the NNCF INT8 model (accuracy_minus_nncf_int8)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pipeline.errors import ConfigError

from .config import FORMAT_EXTRAS
from .errors import ExportError

EXTRA = "mobile"
NEEDS = {"litert": ("litert_torch", "ai_edge_litert"), "tflm": ("litert_torch", "tflite_micro"),
         "ethos_u": ("litert_torch", "ai_edge_litert", "ethosu.vela"), "executorch": ("executorch",)}
# The extra each module comes from (the rest: `mobile`), as FormatSpec.extra declares it for the format.
MODULE_EXTRA = {"ethosu.vela": FORMAT_EXTRAS["ethos_u"]}
# Op names in converter messages: aten.foo.default, torch.ops.aten.foo, 'aten::foo'
OP_PATTERN = re.compile(r"(aten(?:::|\.)[A-Za-z_0-9]+(?:\.[A-Za-z_0-9]+)?)")


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_extra(formats: list[str]) -> list[str]:
    """The requested mobile formats whose packages are not importable here."""
    return [f for f in formats if any(not installed(m) for m in NEEDS.get(f, ()))]


def _extras(modules: list[str]) -> str:
    return ",".join(dict.fromkeys(MODULE_EXTRA.get(m, EXTRA) for m in modules))


def require(fmt: str) -> None:
    missing = [m for m in NEEDS[fmt] if not installed(m)]
    if missing:
        extras = _extras(missing)
        raise ExportError(
            f"Export format '{fmt}' needs {', '.join(missing)}, which is not installed (the `{extras}` extra).",
            f"Install it with `pip install -c constraints.txt -e '.[{extras}]'` (`make venv` does), "
            f"or remove '{fmt}' from export.formats.")


def unsupported(fmt: str, model: nn.Module, example: torch.Tensor, exc: Exception) -> ExportError:
    """A converter failure as a user error: which op, which format, what to do."""
    text = f"{exc}"
    ops = sorted(set(OP_PATTERN.findall(text))) or _ops_of(model, example, text)
    first = text.strip().splitlines()[0][:300] if text.strip() else repr(exc)
    what = f"op {', '.join(ops)}" if ops else "an op of this model"
    return ExportError(f"The {fmt} converter cannot convert {what}: {first}",
                       f"Replace that op in the student (or drop '{fmt}' from export.formats); the other formats "
                       "are not affected.")


def _ops_of(model: nn.Module, example: torch.Tensor, text: str) -> list[str]:
    """Aten ops of the exported graph named in the message (converters often name the op without 'aten')."""
    try:
        graph = torch.export.export(model, (example,)).graph
    except Exception:  # noqa: BLE001 (the model does not even export: the original message says why)
        return []
    names = {str(n.target).split(".")[1] if str(n.target).startswith("aten.") else str(n.target)
             for n in graph.nodes if n.op == "call_function"}
    return sorted(f"aten.{n}" for n in names if re.search(rf"\b{re.escape(n)}\b", text, re.IGNORECASE))


def pt2e_quantize(model: nn.Module, example: torch.Tensor, quantizer, calibration: list[torch.Tensor],
                  fold_quantize: bool) -> nn.Module:
    """fold_quantize: store weights as int8 constants (XNNPACK wants that) or keep their Q/DQ (litert-torch does)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if not calibration:
        raise ExportError("No calibration images for the INT8 mobile formats.", "Set qat.calibration_size >= 1.")
    prepared = prepare_pt2e(torch.export.export(model, (example,)).module(), quantizer)
    with torch.no_grad():
        for image in calibration:
            prepared(image)
    return convert_pt2e(prepared, fold_quantize=fold_quantize)


def litert_convert(model: nn.Module, example: torch.Tensor, path: Path,
                   calibration: list[torch.Tensor] | None = None) -> None:
    """FP32 when `calibration` is None, else full-integer INT8 (int8 input and output: the converter's choice)."""
    import litert_torch
    from litert_torch.quantize import pt2e_quantizer
    from litert_torch.quantize.quant_config import QuantConfig

    def convert():
        if calibration is None:
            return litert_torch.convert(model, (example,))
        quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
            pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
        quantized = pt2e_quantize(model, example, quantizer, calibration, fold_quantize=False)
        return litert_torch.convert(quantized, (example,), quant_config=QuantConfig(pt2e_quantizer=quantizer))

    _guarded("litert", model, example, lambda: convert().export(str(path)))


def executorch_convert(model: nn.Module, example: torch.Tensor, path: Path,
                       calibration: list[torch.Tensor] | None = None) -> dict:
    """Lowered to the XNNPACK delegate; returns how much of the graph XNNPACK took."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config
    from executorch.exir import to_edge_transform_and_lower

    if calibration is not None:
        # Q/DQ left outside XNNPACK (e.g. around an op it does not take) run as portable kernels: register them
        import executorch.kernels.quantized  # noqa: F401

    def convert():
        module = model
        if calibration is not None:
            quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
            module = pt2e_quantize(model, example, quantizer, calibration, fold_quantize=True)
        edge = to_edge_transform_and_lower(torch.export.export(module, (example,)), partitioner=[XnnpackPartitioner()])
        graph = edge.exported_program().graph
        calls = [getattr(n.target, "__name__", str(n.target)) for n in graph.nodes if n.op == "call_function"]
        delegated = sum("executorch_call_delegate" in c for c in calls)
        leftover = sorted({c for c in calls if "executorch_call_delegate" not in c and "getitem" not in c})
        path.write_bytes(edge.to_executorch().buffer)
        return {"xnnpack_subgraphs": delegated, "ops_outside_xnnpack": leftover}

    return _guarded("executorch", model, example, convert)


def _guarded(fmt: str, model: nn.Module, example: torch.Tensor, work: Callable):
    try:
        return work()
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 (converters raise anything; the user needs the op and the format)
        raise unsupported(fmt, model, example, exc) from None


def check_mobile_extra(formats: list[str]) -> None:
    """Refuse a config that asks for a mobile format without the extra, before any stage runs."""
    missing = missing_extra(formats)
    if not missing:
        return
    modules = [m for f in missing for m in NEEDS[f] if not installed(m)]
    extras = _extras(modules)
    what = {"mobile": "the `mobile` extra (litert-torch, ai-edge-litert, tflite-micro, executorch)",
            "npu": "the `npu` extra (ethos-u-vela, Arm's Vela compiler)"}
    raise ConfigError(f"export.formats asks for {', '.join(missing)}, but "
                      f"{' and '.join(what[e] for e in extras.split(','))} "
                      f"{'is' if ',' not in extras else 'are'} not installed in this Python.",
                      f"Install it with `pip install -c constraints.txt -e '.[{extras}]'` (`make venv` does), "
                      f"or remove {', '.join(missing)} from export.formats.")
