"""The qat stage's output as files: quantized.json (how to rebuild), quantized.nncf.json, quantized.pt."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from pipeline.data import View

from .fold import fold_batchnorm
from .nncf_ops import load_quantized, save_quantized

SPEC_FILE = "quantized.json"


def view_of(spec: dict) -> View:
    """The preprocessing a saved model expects, from its JSON spec."""
    return View.from_dict(spec["input"])


def float_model_factory(spec: dict):
    """Builds the float architecture the quantizers were attached to (BatchNorm folded if it was)."""
    from pipeline.models import create_model

    def make() -> nn.Module:
        model = create_model(spec["arch"], spec["num_classes"], spec["input"]["channels"]).eval()
        return fold_batchnorm(model)[0] if spec.get("fold_bn", True) else model

    return make


def save_quantized_student(model: nn.Module, folder: Path, spec: dict) -> None:
    save_quantized(model, folder)
    (Path(folder) / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")


def load_quantized_student(folder: Path) -> tuple[nn.Module, dict]:
    """(NNCF fake-quantized student in eval mode, spec) from a qat stage folder."""
    spec = json.loads((Path(folder) / SPEC_FILE).read_text())
    return load_quantized(folder, float_model_factory(spec)), spec


def teacher_columns(spec: dict) -> list[int]:
    """Columns of the teacher's head that hold the subtask classes (student.json's teacher_ids; older specs
    only have the dataset's class ids, which equal them for a teacher adapted to the dataset)."""
    return list(spec.get("teacher_ids") or spec["class_ids"])
