"""The qat stage's output as files: quantized.json (how to rebuild), quantized.nncf.json, quantized.pt."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from pipeline.models.spec import StudentSpec

from .fold import fold_batchnorm
from .nncf_ops import load_quantized, save_quantized

SPEC_FILE = "quantized.json"


@dataclass(frozen=True)
class QuantizedSpec:
    """quantized.json: the student's spec (flat, as in student.json) plus how it was quantized."""

    student: StudentSpec
    fold_bn: bool
    qat: dict

    def to_json(self) -> dict:
        return {**self.student.to_json(), "fold_bn": self.fold_bn, "qat": self.qat}

    @classmethod
    def from_json(cls, raw: dict) -> "QuantizedSpec":
        return cls(StudentSpec.from_json(raw), bool(raw.get("fold_bn", True)), raw.get("qat") or {})


def float_model_factory(spec: QuantizedSpec):
    """Builds the float architecture the quantizers were attached to (BatchNorm folded if it was)."""
    from pipeline.models import create_model

    def make() -> nn.Module:
        student = spec.student
        model = create_model(student.arch, student.num_classes, student.input.channels).eval()
        return fold_batchnorm(model)[0] if spec.fold_bn else model

    return make


def save_quantized_student(model: nn.Module, folder: Path, spec: QuantizedSpec) -> None:
    save_quantized(model, folder)
    (Path(folder) / SPEC_FILE).write_text(json.dumps(spec.to_json(), indent=2, sort_keys=True) + "\n")


def load_quantized_student(folder: Path) -> tuple[nn.Module, QuantizedSpec]:
    """(NNCF fake-quantized student in eval mode, spec) from a qat stage folder."""
    spec = QuantizedSpec.from_json(json.loads((Path(folder) / SPEC_FILE).read_text()))
    return load_quantized(folder, float_model_factory(spec)), spec
