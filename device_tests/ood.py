"""Inputs outside the subtask, on the device (numpy only): score a prediction, answer "unknown" below the
calibrated threshold, and measure how well in- and out-of-subtask inputs are told apart.

Every score is "higher = more like the subtask":
    msp        max softmax(z / T)              (maximum softmax probability, temperature-scaled)
    energy     T * logsumexp(z / T)            (the negative free energy)
    max_logit  max z
The build calibrates `threshold` on in-subtask validation images so that a fraction `tpr` (0.95) of them is
accepted (score >= threshold); anything below is "unknown" (label UNKNOWN = -1). The build and the device use
this same module, so a score computed on the device is the score the threshold was calibrated for.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np

UNKNOWN = -1
SCORES = ("msp", "energy", "max_logit")
HISTOGRAM_BINS = 40


def _logsumexp(z: np.ndarray) -> np.ndarray:
    top = z.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(z - top).sum(axis=1, keepdims=True)))[:, 0]


def score(logits: np.ndarray, kind: str, temperature: float = 1.0) -> np.ndarray:
    """One score per row of logits (N x K), float64, higher = more in-subtask."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"logits must be N x K, got shape {z.shape}")
    if kind == "max_logit":
        return z.max(axis=1)
    t = float(temperature)
    if t <= 0:
        raise ValueError(f"temperature must be positive, got {t}")
    if kind == "energy":
        return t * _logsumexp(z / t)
    if kind == "msp":
        # max softmax = exp(max z/T - logsumexp(z/T)): no overflow for large logits
        return np.exp(z.max(axis=1) / t - _logsumexp(z / t))
    raise ValueError(f"unknown OOD score '{kind}'; valid scores: {', '.join(SCORES)}")


@dataclass(frozen=True)
class Rule:
    """What travels with an artifact: how to score, and the threshold below which the answer is unknown."""

    score: str
    temperature: float
    threshold: float
    tpr: float = 0.95

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> Optional["Rule"]:
        if not isinstance(d, dict) or d.get("score") not in SCORES or d.get("threshold") is None:
            return None
        return cls(str(d["score"]), float(d.get("temperature", 1.0)), float(d["threshold"]), float(d.get("tpr", 0.95)))

    def to_dict(self) -> dict:
        return asdict(self)

    def scores(self, logits: np.ndarray) -> np.ndarray:
        return score(logits, self.score, self.temperature)

    def accept(self, logits: np.ndarray) -> np.ndarray:
        return self.scores(logits) >= self.threshold


def classify(logits: np.ndarray, rule: Optional[Rule]) -> np.ndarray:
    """Top-1 class per row, or UNKNOWN (-1) where the rule rejects the input. No rule: plain top-1."""
    pred = np.asarray(logits).argmax(axis=1).astype(np.int64)
    if rule is not None:
        pred[~rule.accept(logits)] = UNKNOWN
    return pred


def postprocess(logits: np.ndarray, rule: Optional[Rule] = None) -> tuple[int, float]:
    """One query's answer (batch 1): (class or UNKNOWN, its softmax probability). Timed as post-processing."""
    z = logits[0] - logits[0].max()
    p = np.exp(z)
    p /= p.sum()
    top = int(p.argmax())
    if rule is not None and not rule.accept(logits[:1])[0]:
        return UNKNOWN, float(p[top])
    return top, float(p[top])


def postprocessor(rule: Optional[Rule]) -> Callable[[np.ndarray], tuple[int, float]]:
    return lambda logits: postprocess(logits, rule)


# -- calibration and metrics ---------------------------------------------------------------------------------

def calibrate(in_scores: np.ndarray, tpr: float = 0.95) -> float:
    """The largest threshold that still accepts at least a fraction `tpr` of these (in-subtask) scores."""
    s = np.sort(np.asarray(in_scores, dtype=np.float64))
    if not len(s):
        raise ValueError("no in-subtask scores to calibrate on")
    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    reject = int(np.floor((1.0 - tpr) * len(s) + 1e-9))  # at most this many fall below the threshold
    return float(s[min(reject, len(s) - 1)])


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """P(score of a random in-subtask input > score of a random outside input), ties counted half
    (the Mann-Whitney U statistic over n_in * n_out)."""
    a, b = np.asarray(in_scores, dtype=np.float64), np.asarray(out_scores, dtype=np.float64)
    if not len(a) or not len(b):
        return float("nan")
    values, inverse, counts = np.unique(np.concatenate([a, b]), return_inverse=True, return_counts=True)
    # average rank (1-based) of each distinct value
    ends = np.cumsum(counts)
    mean_rank = ends - (counts - 1) / 2.0
    ranks = mean_rank[inverse]
    u = ranks[:len(a)].sum() - len(a) * (len(a) + 1) / 2.0
    return float(u / (len(a) * len(b)))


def fpr_at_tpr(in_scores: np.ndarray, out_scores: np.ndarray, tpr: float = 0.95) -> float:
    """Fraction of outside inputs accepted at the threshold that accepts `tpr` of these in-subtask inputs."""
    threshold = calibrate(in_scores, tpr)
    return float((np.asarray(out_scores) >= threshold).mean()) if len(out_scores) else float("nan")


def histogram(in_scores: np.ndarray, out_scores: np.ndarray, bins: int = HISTOGRAM_BINS) -> dict:
    """Score distributions on common bins (for the report)."""
    both = np.concatenate([in_scores, out_scores])
    lo, hi = (float(both.min()), float(both.max())) if len(both) else (0.0, 1.0)
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    return {"edges": [float(e) for e in edges],
            "in": np.histogram(in_scores, edges)[0].astype(int).tolist(),
            "out": np.histogram(out_scores, edges)[0].astype(int).tolist()}


def evaluate(in_logits: np.ndarray, in_labels: np.ndarray, out_logits: np.ndarray, rule: Rule,
             with_histogram: bool = True) -> dict:
    """In-subtask inputs (with labels) against outside inputs, for one rule:
    auroc and fpr95 do not depend on the shipped threshold (fpr95 puts its own threshold at 95 % of THESE
    in-subtask inputs); the rest is the shipped operating point: which fraction of in-subtask inputs is kept (tpr_at_threshold),
    which fraction of outside inputs slips through (fpr_at_threshold), top-1 on the accepted in-subtask inputs,
    and open-set accuracy (in-subtask: accepted and correct; outside: rejected) over all inputs."""
    s_in, s_out = rule.scores(in_logits), rule.scores(out_logits)
    accepted = s_in >= rule.threshold
    correct = np.asarray(in_logits).argmax(1) == np.asarray(in_labels)
    rejected_out = s_out < rule.threshold
    result = {
        "score": rule.score, "temperature": rule.temperature, "threshold": rule.threshold,
        "n_in": int(len(s_in)), "n_out": int(len(s_out)),
        "auroc": auroc(s_in, s_out), "fpr95": fpr_at_tpr(s_in, s_out, 0.95),
        "tpr_at_threshold": float(accepted.mean()) if len(s_in) else float("nan"),
        "fpr_at_threshold": float((~rejected_out).mean()) if len(s_out) else float("nan"),
        "accuracy_all": float(correct.mean()) if len(s_in) else float("nan"),
        "accuracy_accepted": float(correct[accepted].mean()) if accepted.any() else float("nan"),
        "open_set_accuracy": float(((correct & accepted).sum() + rejected_out.sum()) / max(len(s_in) + len(s_out), 1)),
    }
    if with_histogram:
        result["histogram"] = histogram(s_in, s_out)
    return result
