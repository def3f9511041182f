"""What a stage hands the next about a saved model: teacher.json and student.json, read and written only here.

A spec is a frozen dataclass; the JSON files keep their flat format (sorted keys, views as {size, channels, mean,
std}), so a folder can still be read without edgesmith."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

from ..data.views import View


@dataclass(frozen=True)
class ModelSpec:
    """Enough to rebuild a saved model (arch, head size, input channels) and to feed it (its view)."""

    stem: ClassVar[str] = "model"
    arch: str
    num_classes: int
    input: View
    class_names: tuple[str, ...]

    def to_json(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_json(cls, raw: dict) -> "ModelSpec":
        values = {}
        for f in fields(cls):
            value = raw.get(f.name)
            values[f.name] = View.from_dict(value) if f.name in cls.views else (
                tuple(value) if isinstance(value, list) else value)
        return cls(**values)

    views: ClassVar[tuple[str, ...]] = ("input",)

    def write(self, folder: Path) -> Path:
        path = Path(folder) / f"{self.stem}.json"
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def read(cls, folder: Path) -> "ModelSpec":
        return cls.from_json(json.loads((Path(folder) / f"{cls.stem}.json").read_text()))


@dataclass(frozen=True)
class TeacherSpec(ModelSpec):
    """teacher.json (teacher and adapt stages): the head's class names, in column order."""

    stem: ClassVar[str] = "teacher"


@dataclass(frozen=True)
class StudentSpec(ModelSpec):
    """student.json (distill stage): the subtask's classes, and how the teacher saw the same images."""

    stem: ClassVar[str] = "student"
    views: ClassVar[tuple[str, ...]] = ("input", "teacher_input")
    teacher_input: View
    class_ids: tuple[int, ...]      # the subtask classes' ids in the dataset
    teacher_ids: tuple[int, ...]    # their columns in the teacher's head
    params: int
    macs: int


def _plain(value):
    if isinstance(value, View):
        return value.to_dict()
    return list(value) if isinstance(value, tuple) else value
