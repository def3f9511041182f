"""Latency and throughput, MLPerf single-stream style: fixed input shape, warm-up discarded, at least
`min_queries` timed queries AND at least `min_duration_s` of timing. The model call is timed on buffers bound
once (nothing allocated or converted inside the timer), back to back as the runtimes' own tools do; a second
loop times each query in three parts: pre-processing (numpy normalisation of the raw image), the call,
post-processing (softmax, top-1)."""

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
    """Batch 1 on a runner's Binding (device_tests.runners.base), cycling through the raw images in `raw`
    (N x C x H x W uint8), in two loops that each meet the protocol (min_queries AND min_duration_s):

    - `model`: the bound call alone, one after another (the next pre-processed image is copied into the bound
      input between calls, outside the timer). This is what the runtimes' own tools measure (benchmark_app,
      trtexec, onnxruntime_perf_test), and what `tool_comparison` compares.
    - the query loop: pre-processing into the bound input, the call, post-processing of the bound output, each
      timed (`preprocess`, `model_in_pipeline`, `postprocess`, their sum `end_to_end`). A runtime whose worker
      thread sleeps while the application pre-processes (OpenVINO's CPU stream) is slower per call here than
      back to back: that difference is the wake-up, and it is real for an application that works between calls.

    `answer`: the post-processing of one query (default softmax + top-1; with an OOD rule it may be unknown).
    Where the runtime times its calls itself (binding.reported_ms), `runtime_reported` summarizes its figures
    for the back-to-back loop."""
    inputs = preprocess(raw[:min(len(raw), 64)])
    model, reported = _model_loop(binding, inputs, settings)
    pre, inner, post, total = _query_loop(binding, preprocess, raw, settings, answer)
    result = {"batch": 1, "queries": len(model), "pipeline_queries": len(inner), "duration_s": total,
              "model": summarize(model), "preprocess": summarize(pre), "model_in_pipeline": summarize(inner),
              "postprocess": summarize(post), "end_to_end": summarize(pre + inner + post)}
    if reported is not None:
        result["runtime_reported"] = summarize(reported)
    return result


def _samples(n: int) -> np.ndarray:
    return np.empty(max(n, 1), np.int64)


def _model_loop(binding, inputs: np.ndarray, settings: LatencySettings) -> tuple[np.ndarray, np.ndarray | None]:
    clock, run, x, copy = time.perf_counter_ns, binding.run, binding.input, np.copyto
    own = binding.reported_ms
    for i in range(settings.warmup):
        copy(x, inputs[i % len(inputs)][None])
        run()
    times, reported = _samples(settings.min_queries), (_samples(settings.min_queries).astype(np.float64) if own else None)
    deadline = clock() + int(settings.min_duration_s * 1e9)
    i = 0
    while i < settings.min_queries or clock() < deadline:
        if i == len(times):  # grow the sample arrays (amortised, between timed calls)
            times = np.resize(times, 2 * len(times))
            reported = np.resize(reported, 2 * len(reported)) if own else None
        copy(x, inputs[i % len(inputs)][None])
        t0 = clock()
        run()
        times[i] = clock() - t0
        if own:
            reported[i] = own() * 1e6   # ms -> ns
        i += 1
    return times[:i], (reported[:i] if own else None)


def _query_loop(binding, preprocess, raw, settings, answer):
    clock, run, x, out, copy = time.perf_counter_ns, binding.run, binding.input, binding.output, np.copyto
    for i in range(settings.warmup):
        copy(x, preprocess(raw[i % len(raw): i % len(raw) + 1]))
        run()
        answer(out)
    pre, model, post = _samples(settings.min_queries), _samples(settings.min_queries), _samples(settings.min_queries)
    start = clock()
    deadline = start + int(settings.min_duration_s * 1e9)
    i = 0
    while i < settings.min_queries or clock() < deadline:
        if i == len(model):
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
        i += 1
    return pre[:i], model[:i], post[:i], (clock() - start) / 1e9


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
