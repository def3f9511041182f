"""Build side of the unknown answer: score a torch model's logits, calibrate the threshold on in-subtask
VALIDATION images, evaluate against out-of-subtask TEST images. The scores and metrics themselves are the
device's (device_tests.ood, numpy only): the threshold is computed by the same code that applies it."""

from __future__ import annotations

import numpy as np

from device_tests.ood import Rule, calibrate, score

from .config import OODConfig


def make_rule(val_logits: np.ndarray, cfg: OODConfig) -> Rule:
    """The threshold that keeps cfg.tpr of these in-subtask validation logits, under cfg's score."""
    threshold = calibrate(score(val_logits, cfg.score, cfg.temperature), cfg.tpr)
    return Rule(cfg.score, cfg.temperature, threshold, cfg.tpr)


def logits_of(model, view, images: np.ndarray, device=None, columns=None) -> np.ndarray:
    import torch

    from ..models.predict import predict_logits

    return predict_logits(model, view, images, device or torch.device("cpu"), columns=columns).numpy()

