"""Time several models one after another with the suite's single-stream protocol (device_tests.latency) and
nothing else: no accuracy, throughput or profile. The student search times its candidates with it, here or on a
target over SSH, one process per measuring round. Torch-free, like the rest of device_tests.

    python -m device_tests.timing --manifest timing.json --out result.json

The manifest (JSON): {"runtime": "onnxruntime", "threads": 1, "cpus": "auto", "images": "images.npy",
"settings": {"min_queries": .., "min_duration_s": .., "warmup": ..},
"models": [{"file": "trial3.int8.onnx", "preprocess": {"size": 28, "channels": 1, "mean": [..], "std": [..]}}]}.
Relative paths are relative to the manifest's folder; images.npy holds raw uint8 images N x C x H x W. The result
lists p50/p99 of the model call per model, in the manifest's order, with the settings and the environment."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from .environment import environment, pinned_cpus
from .errors import DeviceTestError
from .latency import LatencySettings, single_stream
from .measure import EXIT_ERROR, write_json
from .preprocess import Preprocess
from .runners import get_runner

FORMATS = {".onnx": "onnx", ".xml": "openvino", ".tflite": "litert"}


def time_model(path: Path, preprocess: Preprocess, images: np.ndarray, runtime: str, threads: int,
               settings: LatencySettings) -> dict:
    """Single-stream statistics of the bound model call at batch 1 (p50_ms, p99_ms, ...), as the suite measures."""
    fmt = FORMATS.get(Path(path).suffix, "onnx")
    with get_runner(runtime)(Path(path), fmt, threads=threads) as runner:
        shape = (1, preprocess.channels, preprocess.size, preprocess.size)
        result = single_stream(runner.bind(shape), preprocess, images, settings)
    model = result["model"]
    return {"p50_ms": model["p50_ms"], "p99_ms": model["p99_ms"], "queries": result["queries"]}


def time_manifest(manifest: Path) -> dict:
    spec = json.loads(Path(manifest).read_text())
    folder = Path(manifest).parent
    settings = LatencySettings(throughput_batch=1, **spec["settings"])
    images = np.load(folder / spec["images"])
    threads, runtime = int(spec.get("threads", 1)), spec.get("runtime", "onnxruntime")
    with pinned_cpus(threads, spec.get("cpus", "auto")) as pinned:
        models = [{"file": m["file"], **time_model(folder / m["file"], Preprocess.from_spec(m["preprocess"]), images,
                                                   runtime, threads, settings)}
                  for m in spec["models"]]
    return {"status": "passed", "runtime": runtime, "threads": threads, "settings": settings.to_dict(),
            "models": models, "environment": {**environment(), "pinned_cpus": pinned}}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m device_tests.timing", description=__doc__.splitlines()[0])
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result, code = time_manifest(args.manifest), 0
    except (DeviceTestError, OSError, KeyError, ValueError) as exc:  # recorded for the caller, not a traceback
        result, code = {"status": "error", "error_type": type(exc).__name__, "message": str(exc)}, EXIT_ERROR
        print(str(exc), file=sys.stderr)
    write_json(args.out, result)
    return code


if __name__ == "__main__":
    sys.exit(main())
