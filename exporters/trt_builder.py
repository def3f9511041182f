#!/usr/bin/env python3
"""Build a TensorRT engine from an ONNX file ON THE TARGET DEVICE (engines are tied to the GPU model, the
TensorRT version and the driver, so they are never shipped pre-built).

Standalone on purpose: edgesmith copies this file next to the ONNX as tensorrt/build_engine.py, and it needs
only the standard library plus tensorrt (and polygraphy, if installed) on the device.

    python3 build_engine.py                   # options from build_options.json next to this file
    python3 build_engine.py --dry-run         # print what would be built, build nothing
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_options(path: Path) -> dict:
    options = json.loads(Path(path).read_text())
    base = Path(path).resolve().parent
    for key in ("onnx", "engine", "timing_cache"):
        if options.get(key):
            options[key] = str((base / options[key]).resolve())
    return options


def plan(options: dict, trt_major: int | None = None) -> dict:
    """How the options map onto TensorRT: INT8 comes from the Q/DQ nodes in the ONNX (explicit quantization;
    implicit calibration is gone in TensorRT 11), so INT8 uses a strongly typed network where available."""
    precision = options["precision"]
    strongly_typed = precision == "int8" and (trt_major is None or trt_major >= 10)
    return {
        "onnx": options["onnx"],
        "engine": options["engine"],
        "strongly_typed": strongly_typed,
        "fp16": precision == "fp16" or (precision == "int8" and not strongly_typed),
        "int8": precision == "int8" and not strongly_typed,
        "workspace_bytes": int(options["workspace_mb"]) << 20,
        "timing_cache": options.get("timing_cache"),
        "profile": {options["input_name"]: {k: options["shapes"][k] for k in ("min", "opt", "max")}},
    }


def build(options: dict) -> Path:
    import tensorrt as trt  # noqa: F401  (fail early with ImportError if TensorRT is missing)
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, SaveEngine

    steps = plan(options, int(trt.__version__.split(".")[0]))
    profile = Profile()
    for name, shapes in steps["profile"].items():
        profile.add(name, min=shapes["min"], opt=shapes["opt"], max=shapes["max"])
    cache = steps["timing_cache"]
    config = CreateConfig(fp16=steps["fp16"], int8=steps["int8"], profiles=[profile],
                          memory_pool_limits={trt.MemoryPoolType.WORKSPACE: steps["workspace_bytes"]},
                          load_timing_cache=cache if cache and Path(cache).is_file() else None)
    network = NetworkFromOnnxPath(steps["onnx"], strongly_typed=steps["strongly_typed"])
    engine = EngineFromNetwork(network, config=config, save_timing_cache=cache)
    SaveEngine(engine, steps["engine"])()
    return Path(steps["engine"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", type=Path, default=HERE / "build_options.json")
    parser.add_argument("--engine", help="where to write the engine (default: from the options)")
    parser.add_argument("--dry-run", action="store_true", help="print the build plan as JSON and exit")
    args = parser.parse_args(argv)
    options = load_options(args.options)
    if args.engine:
        options["engine"] = str(Path(args.engine).resolve())
    if args.dry_run:
        print(json.dumps(plan(options), indent=2, sort_keys=True))
        return 0
    try:
        print(f"engine written to {build(options)}")
    except ImportError as exc:
        print(f"TensorRT or Polygraphy is not installed here ({exc}). Install TensorRT for this device "
              "(JetPack, or `pip install tensorrt polygraphy` on x86 with CUDA) or use trtexec via build_engine.sh.",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
