"""Models: architectures by name, teacher sources, weight conversion, saved-model loading."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .complexity import count_macs, count_params
from .convert import load_weights, map_by_position, read_state_dict
from .registry import ARCHS, create_model
from .spec import ModelSpec, StudentSpec, TeacherSpec

__all__ = ["ARCHS", "create_model", "count_macs", "count_params", "load_weights", "map_by_position",
           "read_state_dict", "save_model", "load_saved_model", "load_teacher", "load_student", "ModelSpec",
           "StudentSpec", "TeacherSpec"]


def save_model(model: nn.Module, folder: Path, spec: ModelSpec) -> None:
    """`<stem>.pt` (state_dict) and `<stem>.json` (the spec: what is needed to rebuild and feed it)."""
    import torch

    torch.save(model.state_dict(), Path(folder) / f"{spec.stem}.pt")
    spec.write(folder)


def load_saved_model(folder: Path, spec_type: type[ModelSpec]) -> tuple[nn.Module, ModelSpec]:
    folder = Path(folder)
    spec = spec_type.read(folder)
    weights = folder / f"{spec.stem}.pt"
    model = create_model(spec.arch, spec.num_classes, spec.input.channels)
    load_weights(model, read_state_dict(weights), "timm", str(weights))
    return model.eval(), spec


def load_teacher(folder: Path) -> tuple[nn.Module, TeacherSpec]:
    return load_saved_model(folder, TeacherSpec)


def load_student(folder: Path) -> tuple[nn.Module, StudentSpec]:
    return load_saved_model(folder, StudentSpec)
