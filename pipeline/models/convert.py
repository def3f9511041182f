"""Load weights written by another implementation of the same architecture, mapped by position."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError


def read_state_dict(path: str | Path) -> "OrderedDict[str, torch.Tensor]":
    """torch.load with weights_only=True; unwraps {'state_dict': ...} / {'model': ...} containers."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"Weights file {path} does not exist.", "Check teacher.weights (a path or package:<module>/<file>).")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise ModelError(f"{path} cannot be read as a PyTorch checkpoint ({type(exc).__name__}: {str(exc)[:200]}).",
                         "Pass a state_dict saved with torch.save; pickled whole models are refused for safety.") from None
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{path} does not hold a state_dict of tensors.", "Save it with torch.save(model.state_dict()).")
    return OrderedDict(obj)


def map_by_position(model: nn.Module, source: "OrderedDict[str, torch.Tensor]") -> "OrderedDict[str, torch.Tensor]":
    """Rename `source` onto `model`'s parameter names in order, with a strict shape check at every position."""
    target = model.state_dict()
    src_items = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst_keys = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src_items) != len(dst_keys):
        raise ModelError(
            f"The weights hold {len(src_items)} tensors but the architecture has {len(dst_keys)}.",
            "Positional conversion needs the same architecture (check teacher.name and num_classes).",
        )
    mapped = OrderedDict()
    for i, ((src_key, tensor), dst_key) in enumerate(zip(src_items, dst_keys)):
        if tuple(tensor.shape) != tuple(target[dst_key].shape):
            raise ModelError(
                f"Positional conversion fails at tensor #{i}: '{src_key}' {tuple(tensor.shape)} does not fit "
                f"'{dst_key}' {tuple(target[dst_key].shape)}.",
                "The weights are not of this architecture, or num_classes differs; check teacher.name / num_classes.",
            )
        mapped[dst_key] = tensor
    for key, value in target.items():
        if key.endswith("num_batches_tracked"):
            mapped[key] = value
    return mapped


def load_weights(model: nn.Module, state: "OrderedDict[str, torch.Tensor]", fmt: str, origin: str) -> None:
    if fmt == "positional":
        state = map_by_position(model, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    problems = [k for k in missing if not k.endswith("num_batches_tracked")]
    if problems or unexpected:
        raise ModelError(
            f"{origin} does not match the architecture: missing {problems[:5]}, unexpected {list(unexpected)[:5]}"
            f"{' ...' if len(problems) > 5 or len(unexpected) > 5 else ''}.",
            "Use weights_format: positional for weights from another implementation of the same architecture.",
        )
