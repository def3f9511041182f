#!/usr/bin/env python3
"""Cross-check edgesmith's latency measurement against OpenVINO's own benchmark_app on the same IR, same
threads, batch 1, f32. Runs are interleaved (ours, theirs, ours, ...) so that load from other processes hits
both alike; prints a Markdown table of medians and their ratio.

    python scripts/compare_benchmark_app.py MODEL.xml --shape 1,3,128,128 [--threads 1] [--rounds 3] [--duration 5]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def benchmark_app() -> list[str]:
    exe = Path(sys.executable).with_name("benchmark_app")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "openvino.tools.benchmark.main"]


def theirs(model: Path, shape: str, threads: int, duration: float) -> float:
    # -hint none is benchmark_app's rule for setting threads/streams by hand; one stream, sync API, the same
    # dynamic model fed one shape, input filling kept out of the timed loop (inference_only).
    args = [*benchmark_app(), "-m", str(model), "-d", "CPU", "-api", "sync", "-hint", "none", "-nstreams", "1",
            "-nthreads", str(threads), "-infer_precision", "f32", "-data_shape", f"[{shape}]", "-inference_only", "true",
            "-t", str(max(1, round(duration)))]  # whole seconds only
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120 + 2 * duration)
    out = proc.stdout + proc.stderr  # benchmark_app logs to stderr
    match = re.search(r"Median:\s+([\d.]+) (ms|us)", out)  # it switches to microseconds for fast models
    if not match:
        raise SystemExit(f"benchmark_app printed no median:\n{out[-2000:]}")
    return float(match.group(1)) / (1000 if match.group(2) == "us" else 1)


def ours(model: Path, shape: str, threads: int, duration: float) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        args = [sys.executable, "-m", "device_tests.measure", "--model", str(model), "--runtime", "openvino",
                "--threads", str(threads), "--shape", shape, "--min-queries", "1024", "--min-duration", str(duration),
                "--throughput-batch", "1", "--out", str(out)]
        subprocess.run(args, cwd=ROOT, capture_output=True, timeout=120 + 4 * duration)
        result = json.loads(out.read_text())
    if result.get("status") != "passed":
        raise SystemExit(result.get("message"))
    return result["latency"]["model"]["p50_ms"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("--shape", required=True, help="N,C,H,W with N = 1")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0)
    a = p.parse_args()
    rows = []
    for i in range(a.rounds):
        rows.append((ours(a.model, a.shape, a.threads, a.duration), theirs(a.model, a.shape, a.threads, a.duration)))
        print(f"round {i + 1}: edgesmith p50 {rows[-1][0]:.3f} ms, benchmark_app median {rows[-1][1]:.3f} ms", file=sys.stderr)
    med_ours, med_theirs = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
    print(f"| model | threads | rounds | edgesmith p50 (ms) | benchmark_app median (ms) | ratio |")
    print(f"|---|---|---|---|---|---|")
    print(f"| {a.model.name} {a.shape} | {a.threads} | {a.rounds} | {med_ours:.3f} | {med_theirs:.3f} | {med_ours / med_theirs:.3f} |")
    print("per round: " + ", ".join(f"{o:.3f}/{t:.3f}" for o, t in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
