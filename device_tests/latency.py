"""Latency and throughput, MLPerf single-stream style: fixed input shape, warm-up discarded, at least
`min_queries` timed queries AND at least `min_duration_s` of timing. Each query is timed in three parts:
pre-processing (numpy normalisation of the raw image), the model call alone, post-processing (softmax, top-1)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

QUANTILES = (50, 90, 99)


@dataclass(frozen=True)
class LatencySettings:
    min_queries: int = 1024
    min_duration_s: float = 2.0
    warmup: int = 50
    throughput_batch: int = 64

    def __post_init__(self):
        if self.min_queries < 1 or self.min_duration_s < 0 or self.warmup < 0 or self.throughput_batch < 1:
            raise ValueError(f"invalid latency settings {self}")

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(ns: np.ndarray) -> dict:
    """Statistics in milliseconds, plus the CDF at every percentile (101 points) for plots."""
    ms = np.asarray(ns, dtype=np.float64) / 1e6
    stats = {f"p{q}_ms": float(np.percentile(ms, q)) for q in QUANTILES}
    stats.update(mean_ms=float(ms.mean()), std_ms=float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,
                 min_ms=float(ms.min()), max_ms=float(ms.max()), n=int(len(ms)),
                 cdf_ms=[round(float(v), 6) for v in np.percentile(ms, np.arange(101))])
    return stats


def postprocess(logits: np.ndarray) -> tuple[int, float]:
    z = logits[0] - logits[0].max()
    p = np.exp(z)
    p /= p.sum()
    top = int(p.argmax())
    return top, float(p[top])


def single_stream(infer: Callable[[np.ndarray], np.ndarray], preprocess: Callable[[np.ndarray], np.ndarray],
                  raw: np.ndarray, settings: LatencySettings, answer: Callable = postprocess) -> dict:
    """Batch 1, one query after another, cycling through the raw images in `raw` (N x C x H x W uint8).
    `answer`: the post-processing of one query (default softmax + top-1; with an OOD rule it may be unknown)."""
    clock = time.perf_counter_ns
    for i in range(settings.warmup):
        answer(infer(preprocess(raw[i % len(raw): i % len(raw) + 1])))
    pre, model, post = [], [], []
    start = clock()
    deadline = start + int(settings.min_duration_s * 1e9)
    i = 0
    while i < settings.min_queries or clock() < deadline:
        image = raw[i % len(raw): i % len(raw) + 1]
        t0 = clock()
        x = preprocess(image)
        t1 = clock()
        logits = infer(x)
        t2 = clock()
        answer(logits)
        t3 = clock()
        pre.append(t1 - t0)
        model.append(t2 - t1)
        post.append(t3 - t2)
        i += 1
    total = (clock() - start) / 1e9
    end_to_end = np.add(np.add(pre, model), post)
    return {"batch": 1, "queries": i, "duration_s": total, "model": summarize(np.array(model)),
            "preprocess": summarize(np.array(pre)), "postprocess": summarize(np.array(post)),
            "end_to_end": summarize(end_to_end)}


def throughput(infer: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, settings: LatencySettings) -> dict:
    """Images per second of the model call at a larger batch (input already pre-processed)."""
    clock = time.perf_counter_ns
    for _ in range(max(1, min(settings.warmup, 3))):
        infer(batch)
    min_batches = max(4, math.ceil(settings.min_queries / len(batch)))
    times = []
    start = clock()
    deadline = start + int(settings.min_duration_s * 1e9)
    while len(times) < min_batches or clock() < deadline:
        t0 = clock()
        infer(batch)
        times.append(clock() - t0)
    seconds = sum(times) / 1e9
    return {"batch": int(len(batch)), "batches": len(times), "duration_s": (clock() - start) / 1e9,
            "images_per_s": len(batch) * len(times) / seconds, "batch_p50_ms": float(np.median(times) / 1e6)}
