"""Does the student decide like the teacher? Heatmaps of the logit gap for both on the same test images, their
agreement at a common resolution, and a pixel-flipping curve for the student. Used by the validate stage
(`validate.explain`) and by bench/xai_spurious.py."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data import View
from ..data.views import as_tensor
from ..seeds import seed_for
from .agreement import agreement, pixel_flipping, pixel_map
from .heatmaps import Explainer, logit_gap, make_explainer, relevance


@dataclass
class Explained:
    metrics: dict                   # JSON-able summary (stage.json)
    images: np.ndarray              # uint8 N x C x H x W, the explained test images
    labels: np.ndarray
    teacher_maps: np.ndarray        # N x Ht x Wt, at the teacher's resolution
    student_maps: np.ndarray        # N x Hs x Ws
    cosine: np.ndarray              # per image, at the common size
    spearman: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        return {"images_u8": self.images, "labels": self.labels, "teacher_maps": self.teacher_maps,
                "student_maps": self.student_maps, "cosine": self.cosine, "spearman": self.spearman}


def sample(n_total: int, n: int, seed: int) -> np.ndarray:
    """A seeded sample of test indices (sorted)."""
    return np.sort(np.random.default_rng(seed_for(seed, "xai.images")).permutation(n_total)[:n])


def explain_pair(teacher, teacher_view: View, teacher_ids: list[int], student, student_view: View,
                 images: np.ndarray, labels: np.ndarray, cfg, seed: int = 0,
                 teacher_explainer: Explainer | None = None, teacher_cache: dict | None = None) -> Explained:
    """`cfg` is an ExplainConfig; images/labels are the test split (labels 0..k-1). To compare several students
    with one teacher, pass the same `teacher_cache` dict: the teacher's heatmaps are then computed once."""
    index = sample(len(labels), cfg.images, seed)
    raw, targets = as_tensor(images[index]), torch.as_tensor(labels[index])
    size = cfg.size or images.shape[-1]
    cache = teacher_cache if teacher_cache is not None else {}
    if "explainer" not in cache:
        cache["explainer"] = teacher_explainer or make_explainer(teacher, cfg.method, cfg.composite)
    t_expl = cache["explainer"]
    s_expl = make_explainer(student, cfg.method, cfg.composite)
    n_student = _num_outputs(s_expl.model, student_view, raw)
    student_ids = list(range(n_student))
    key = (tuple(index), size)
    if cache.get("key") != key:
        cache["key"], cache["relevance"] = key, relevance(t_expl, teacher_view, raw, targets, teacher_ids, cfg.batch_size)
    t_rel, t_gap = cache["relevance"]
    s_rel, s_gap = relevance(s_expl, student_view, raw, targets, student_ids, cfg.batch_size)
    t_map, s_map = pixel_map(t_rel), pixel_map(s_rel)
    scores = agreement(t_map, s_map, size)
    flipping = _student_flipping(s_expl, student_view, raw, targets, student_ids, s_map, cfg, seed)
    metrics = {
        "images": len(index), "common_size": size,
        "cosine_mean": _mean(scores["cosine"]), "cosine_std": _std(scores["cosine"]),
        "spearman_mean": _mean(scores["spearman"]), "spearman_std": _std(scores["spearman"]),
        "teacher": {**t_expl.describe(), **_conservation(t_rel, t_gap), "input": list(t_rel.shape[1:])},
        "student": {**s_expl.describe(), **_conservation(s_rel, s_gap), "input": list(s_rel.shape[1:])},
        "student_pixel_flipping": flipping, "zennit": _zennit_version(),
    }
    return Explained(metrics, images[index], labels[index], t_map.numpy(), s_map.numpy(),
                     scores["cosine"].numpy(), scores["spearman"].numpy())


def _student_flipping(expl: Explainer, view: View, raw, targets, columns, maps, cfg, seed) -> dict:
    x = view(raw)
    model = expl.model.eval()

    def gaps(logits, rows):
        return logit_gap(logits, targets[rows], columns)

    return pixel_flipping(model, x, maps, gaps, cfg.flip_steps, seed_for(seed, "xai.flipping"), cfg.batch_size)


@torch.no_grad()
def _num_outputs(model, view: View, raw) -> int:
    return int(model.eval()(view(raw[:1])).shape[1])


def _conservation(rel: torch.Tensor, gap: torch.Tensor) -> dict:
    """Input relevance summed per image vs the logit gap it explains (LRP: equal up to what biases absorb)."""
    total = rel.flatten(1).sum(1).double()
    gap = gap.double()
    return {"mean_logit_gap": float(gap.mean()), "mean_relevance_sum": float(total.mean()),
            "conservation": float(total.sum() / gap.sum()) if float(gap.sum()) else float("nan")}


def _mean(x: torch.Tensor) -> float:
    return float(x.double().mean())


def _std(x: torch.Tensor) -> float:
    return float(x.double().std()) if len(x) > 1 else 0.0


def _zennit_version() -> str:
    try:
        from importlib.metadata import version

        import zennit  # noqa: F401

        return version("zennit")
    except Exception:  # noqa: BLE001
        return "absent"
