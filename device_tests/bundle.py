"""A bundle folder as the device sees it: artifacts.json (artifacts, preprocessing spec, class names), the
artifact files it lists, and eval.npz. Everything is checked on load; every problem is reported at once."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import BundleError, EvalSetError
from .preprocess import Preprocess

METADATA = "artifacts.json"
EVAL_FILE = "eval.npz"
SPEC_KEYS = ("preprocessing", "preprocess", "input")  # accepted names of the preprocessing spec


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Artifact:
    file: str
    format: str
    precision: str
    path: Path
    sha256: Optional[str] = None
    size: Optional[int] = None
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def id(self) -> str:
        return self.file

    @classmethod
    def from_path(cls, path: Path, precision: str = "unknown") -> "Artifact":
        """An artifact that no artifacts.json describes (`edgesmith profile`): format from the suffix."""
        return cls(path.name, format_of(path), precision, path, None, path.stat().st_size if path.exists() else None)


FORMATS = {".onnx": "onnx", ".xml": "openvino", ".engine": "tensorrt", ".plan": "tensorrt", ".trt": "tensorrt",
           ".tflite": "litert", ".pte": "executorch"}  # a .tflite runs under TFLite Micro too: --runtime tflm


def format_of(path: Path) -> str:
    try:
        return FORMATS[path.suffix.lower()]
    except KeyError:
        raise BundleError(f"{path} has suffix '{path.suffix}', which is not a model format edgesmith can run.",
                          f"Pass one of: {', '.join(sorted(FORMATS))} "
                          "(ONNX, OpenVINO IR, TensorRT engine, LiteRT, ExecuTorch).") from None


@dataclass
class EvalSet:
    images_u8: np.ndarray
    labels: np.ndarray
    teacher_pred: Optional[np.ndarray] = None
    fp32_pred: Optional[np.ndarray] = None
    int8_pred: Optional[np.ndarray] = None   # the quantized torch model's predictions, when there is one
    ood_images_u8: Optional[np.ndarray] = None  # images from outside the subtask (the dataset's other classes)

    @classmethod
    def load(cls, path: Path) -> "EvalSet":
        path = Path(path)
        if not path.is_file():
            raise EvalSetError(f"The evaluation set {path} does not exist.",
                               "Pass the eval.npz written by the export stage (images_u8, labels, teacher_pred, fp32_pred).")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError) as exc:
            raise EvalSetError(f"{path} is not a readable .npz file ({exc}).",
                               "Re-run the export stage to rewrite it.") from None
        if "images_u8" not in arrays or "labels" not in arrays:
            raise EvalSetError(f"{path} holds {sorted(arrays)} but needs at least images_u8 and labels.",
                               "Write images_u8 (uint8 N x C x H x W) and labels (N integers) into it.")
        images, labels = arrays["images_u8"], arrays["labels"]
        problems = []
        if images.dtype != np.uint8 or images.ndim != 4:
            problems.append(f"images_u8 is {images.dtype} with shape {images.shape}, not uint8 N x C x H x W")
        for key in ("labels", "teacher_pred", "fp32_pred", "int8_pred"):
            if key in arrays and arrays[key].shape != (len(images),):
                problems.append(f"{key} has shape {arrays[key].shape}, expected ({len(images)},)")
        ood = arrays.get("ood_images_u8")
        if ood is not None and (ood.dtype != np.uint8 or ood.shape[1:] != images.shape[1:]):
            problems.append(f"ood_images_u8 is {ood.dtype} {ood.shape}, not uint8 like images_u8 {images.shape}")
        if problems:
            raise EvalSetError(f"{path}: " + "; ".join(problems) + ".", "Re-run the export stage to rewrite eval.npz.")
        return cls(images, labels.astype(np.int64), _ints(arrays.get("teacher_pred")), _ints(arrays.get("fp32_pred")),
                   _ints(arrays.get("int8_pred")), ood)

    def __len__(self) -> int:
        return len(self.labels)


def _ints(array: Optional[np.ndarray]) -> Optional[np.ndarray]:
    return None if array is None else array.astype(np.int64)


@dataclass
class Bundle:
    root: Path
    artifacts: list[Artifact]
    preprocess: Preprocess
    class_names: list[str]
    metadata: dict

    @classmethod
    def load(cls, root: Path, verify: bool = True) -> "Bundle":
        root = Path(root)
        meta_file = root / METADATA
        if not root.is_dir():
            raise BundleError(f"The bundle folder {root} does not exist.",
                              "Pass --bundle with the export stage's output folder (or a release bundle).")
        if not meta_file.is_file():
            raise BundleError(f"{root} has no {METADATA}, so it is not a bundle.",
                              "Pass the folder the export stage wrote (it holds artifacts.json, the models and eval.npz).")
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BundleError(f"{meta_file} is not valid JSON ({exc}).", "Re-run the export stage to rewrite it.") from None
        bundle = cls(root, _artifacts(root, meta), Preprocess.from_spec(_spec(meta, meta_file)),
                     [str(c) for c in meta.get("class_names", [])], meta)
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        """Every listed file exists with the recorded size and sha256, and eval.npz is present."""
        problems = [p for a in self.artifacts for p in check_artifact(a)]
        if not (self.root / EVAL_FILE).is_file():
            problems.append(f"{EVAL_FILE} is missing")
        if problems:
            raise BundleError(f"The bundle {self.root} is incomplete or altered: " + "; ".join(problems) + ".",
                              "Copy the bundle again from the build output (or re-run the export stage); "
                              "a file that changed after export cannot be validated.")

    def eval_set(self) -> EvalSet:
        return EvalSet.load(self.root / EVAL_FILE)

    def for_formats(self, formats: tuple[str, ...]) -> list[Artifact]:
        return [a for a in self.artifacts if a.format in formats]


def _spec(meta: dict, meta_file: Path) -> dict:
    for key in SPEC_KEYS:
        if isinstance(meta.get(key), dict):
            return meta[key]
    raise BundleError(f"{meta_file} has no preprocessing spec (looked for {', '.join(SPEC_KEYS)}).",
                      "The export stage writes it as {\"preprocessing\": {\"size\", \"channels\", \"mean\", \"std\"}}.")


def _artifacts(root: Path, meta: dict) -> list[Artifact]:
    entries = meta.get("artifacts")
    if not isinstance(entries, list) or not entries:
        raise BundleError(f"{root / METADATA} lists no artifacts.",
                          "Re-run the export stage; it records every file it writes.")
    known = ("file", "format", "precision", "sha256", "size")
    artifacts = []
    for entry in entries:
        if not isinstance(entry, dict) or "file" not in entry or "format" not in entry:
            raise BundleError(f"An artifact entry in {root / METADATA} lacks 'file' or 'format': {entry!r}.",
                              "Each entry needs at least file and format (and sha256, size, precision).")
        rel = Path(entry["file"])
        if rel.is_absolute() or ".." in rel.parts:
            raise BundleError(f"Artifact path {rel} leaves the bundle folder.",
                              "Artifact paths must be relative, without '..'.")
        artifacts.append(Artifact(str(entry["file"]), str(entry["format"]), str(entry.get("precision", "unknown")),
                                  root / rel, entry.get("sha256"), entry.get("size"),
                                  {k: v for k, v in entry.items() if k not in known}))
    return artifacts


def check_artifact(artifact: Artifact) -> list[str]:
    if not artifact.path.is_file():
        return [f"{artifact.file} is missing"]
    problems = []
    if artifact.size is not None and artifact.path.stat().st_size != artifact.size:
        problems.append(f"{artifact.file} has {artifact.path.stat().st_size} bytes, artifacts.json says {artifact.size}")
    if artifact.sha256 and sha256_file(artifact.path) != artifact.sha256:
        problems.append(f"{artifact.file} does not match its recorded sha256")
    if artifact.format == "openvino" and not artifact.path.with_suffix(".bin").is_file():
        problems.append(f"{artifact.path.with_suffix('.bin').name} (weights of {artifact.file}) is missing")
    return problems
