"""Models: architectures by name, teacher sources, weight conversion, saved-model loading."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from .complexity import count_macs, count_params
from .convert import load_weights, map_by_position, read_state_dict
from .registry import ARCHS, create_model

__all__ = ["ARCHS", "create_model", "count_macs", "count_params", "load_weights", "map_by_position",
           "read_state_dict", "save_model", "load_saved_model", "load_teacher", "load_student"]


def save_model(model: nn.Module, folder: Path, stem: str, spec: dict) -> None:
    """`<stem>.pt` (state_dict) and `<stem>.json` (what is needed to rebuild it)."""
    import torch

    torch.save(model.state_dict(), folder / f"{stem}.pt")
    (folder / f"{stem}.json").write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")


def load_saved_model(folder: Path, stem: str) -> tuple[nn.Module, dict]:
    folder = Path(folder)
    spec = json.loads((folder / f"{stem}.json").read_text())
    model = create_model(spec["arch"], spec["num_classes"], spec["input"]["channels"])
    load_weights(model, read_state_dict(folder / f"{stem}.pt"), "timm", str(folder / f"{stem}.pt"))
    return model.eval(), spec


def load_teacher(folder: Path) -> tuple[nn.Module, dict]:
    return load_saved_model(folder, "teacher")


def load_student(folder: Path) -> tuple[nn.Module, dict]:
    return load_saved_model(folder, "student")
