"""Accuracy of an artifact on the evaluation set: top-1, agreement with the teacher and the FP32 student,
per-class accuracy, confusion matrix (rows: true class, columns: predicted)."""

from __future__ import annotations

import base64
from typing import Callable, Optional

import numpy as np


def predict(infer: Callable[[np.ndarray], np.ndarray], inputs: np.ndarray, batch: int) -> np.ndarray:
    """Logits for all inputs, in batches of `batch` (the last one padded if the model's batch is fixed)."""
    out = []
    for start in range(0, len(inputs), batch):
        chunk = inputs[start:start + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        out.append(np.asarray(infer(np.ascontiguousarray(chunk)))[:n])
    return np.concatenate(out)


def encode_logits(logits: np.ndarray) -> dict:
    """The logits on the evaluation set, exactly (float32, base64): another target's run of the same artifact
    is compared with them image by image (top-1 agreement, max |dlogit|), e.g. an ARM board against x86."""
    z = np.ascontiguousarray(logits, dtype="<f4")
    return {"shape": list(z.shape), "float32_b64": base64.b64encode(z.tobytes()).decode("ascii")}


def decode_logits(encoded: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(encoded["float32_b64"]), dtype="<f4").reshape(encoded["shape"])


def scores(pred: np.ndarray, labels: np.ndarray, num_classes: int, teacher_pred: Optional[np.ndarray] = None,
           fp32_pred: Optional[np.ndarray] = None, int8_pred: Optional[np.ndarray] = None) -> dict:
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, pred), 1)
    support = confusion.sum(1)
    per_class = [float(confusion[c, c] / support[c]) if support[c] else None for c in range(num_classes)]
    result = {"n": int(len(labels)), "top1": float((pred == labels).mean()), "per_class": per_class,
              "confusion": confusion.tolist()}
    if teacher_pred is not None:
        result["agreement_teacher"] = float((pred == teacher_pred).mean())
    if fp32_pred is not None:
        result["agreement_fp32"] = float((pred == fp32_pred).mean())
    if int8_pred is not None:
        result["agreement_int8"] = float((pred == int8_pred).mean())
    return result


def reference(labels: np.ndarray, teacher_pred: Optional[np.ndarray], fp32_pred: Optional[np.ndarray],
              int8_pred: Optional[np.ndarray] = None) -> dict:
    """Accuracies of the teacher and the FP32 student on the same set, as recorded at export time."""
    ref = {}
    if teacher_pred is not None:
        ref["teacher_top1"] = float((teacher_pred == labels).mean())
    if fp32_pred is not None:
        ref["fp32_top1"] = float((fp32_pred == labels).mean())
    if int8_pred is not None:
        ref["int8_top1"] = float((int8_pred == labels).mean())
    return ref
