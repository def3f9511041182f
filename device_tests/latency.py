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


def single_stream(binding, preprocess: Callable[[np.ndarray], np.ndarray], raw: np.ndarray,
                  settings: LatencySettings, answer: Callable = postprocess) -> dict:
    """Batch 1, one query after another, cycling through the raw images in `raw` (N x C x H x W uint8), on a
    runner's Binding (device_tests.runners.base): pre-processing writes into the bound input buffer, the model
    time is `binding.run()` alone (nothing allocated or converted inside the timer, as in the runtimes' own
    benchmark loops), post-processing reads the bound output. `answer`: the post-processing of one query
    (default softmax + top-1; with an OOD rule it may be unknown). Where the runtime times its own calls
    (binding.reported_ms), those figures are summarized too, as `runtime_reported`."""
    clock = time.perf_counter_ns
    run, x, out, copy = binding.run, binding.input, binding.output, np.copyto
    for i in range(settings.warmup):
        copy(x, preprocess(raw[i % len(raw): i % len(raw) + 1]))
        run()
        answer(out)
    n_max = max(settings.min_queries, 1)
    pre, model, post = (np.empty(n_max, np.int64) for _ in range(3))
    reported = [] if binding.reported_ms is not None else None
    start = clock()
    deadline = start + int(settings.min_duration_s * 1e9)
    i = 0
    while i < settings.min_queries or clock() < deadline:
        if i == len(model):  # grow the preallocated sample arrays (amortised, outside the timed parts)
            pre, model, post = (np.resize(a, 2 * len(a)) for a in (pre, model, post))
        image = raw[i % len(raw): i % len(raw) + 1]
        t0 = clock()
        copy(x, preprocess(image))
        t1 = clock()
        run()
        t2 = clock()
        answer(out)
        t3 = clock()
        pre[i], model[i], post[i] = t1 - t0, t2 - t1, t3 - t2
        if reported is not None:
            reported.append(binding.reported_ms())
        i += 1
    total = (clock() - start) / 1e9
    pre, model, post = pre[:i], model[:i], post[:i]
    result = {"batch": 1, "queries": i, "duration_s": total, "model": summarize(model),
              "preprocess": summarize(pre), "postprocess": summarize(post), "end_to_end": summarize(pre + model + post)}
    if reported:
        result["runtime_reported"] = summarize(np.asarray(reported) * 1e6)
    return result


def throughput(binding, batch: np.ndarray, settings: LatencySettings) -> dict:
    """Images per second of the model call at a larger batch, on a Binding of that batch's shape (input
    pre-processed and written into the bound buffer once)."""
    clock = time.perf_counter_ns
    np.copyto(binding.input, batch)
    infer = binding.run
    for _ in range(max(1, min(settings.warmup, 3))):
        infer()
    min_batches = max(4, math.ceil(settings.min_queries / len(batch)))
    times = []
    start = clock()
    deadline = start + int(settings.min_duration_s * 1e9)
    while len(times) < min_batches or clock() < deadline:
        t0 = clock()
        infer()
        times.append(clock() - t0)
    seconds = sum(times) / 1e9
    return {"batch": int(len(batch)), "batches": len(times), "duration_s": (clock() - start) / 1e9,
            "images_per_s": len(batch) * len(times) / seconds, "batch_p50_ms": float(np.median(times) / 1e6)}
