"""TensorRT: build the engine here when TensorRT and a GPU exist; always ship the scripts that build it on
the target (an engine only runs on the GPU model, TensorRT version and driver it was built with)."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

from .config import TensorRTConfig

SCRIPT_NAME = "build_engine.sh"
BUILDER_NAME = "build_engine.py"
OPTIONS_NAME = "build_options.json"


def availability() -> tuple[bool, str]:
    """(can build here, why not). Imports lazily: tensorrt is optional and absent on most build machines."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "the tensorrt package is not installed on the build machine"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU on the build machine"
    return True, ""


def build_options(cfg: TensorRTConfig, onnx_name: str, input_name: str, chw: tuple[int, int, int]) -> dict:
    """Paths are relative to the tensorrt/ folder, so the bundle can move."""
    shape = lambda n: [n, *chw]  # noqa: E731
    return {
        "onnx": f"../{onnx_name}",
        "engine": f"model.{cfg.precision}.engine",
        "precision": cfg.precision,
        "workspace_mb": cfg.workspace_mb,
        "timing_cache": "timing.cache" if cfg.timing_cache else None,
        "input_name": input_name,
        "shapes": {"min": shape(cfg.min_batch), "opt": shape(cfg.opt_batch), "max": shape(cfg.max_batch)},
    }


def trtexec_command(options: dict) -> list[str]:
    """The same build through trtexec, as an argument list (paths relative to the script's folder)."""
    dims = lambda s: "x".join(map(str, s))  # noqa: E731
    name = options["input_name"]
    cmd = ["trtexec", f"--onnx={options['onnx']}", f"--saveEngine={options['engine']}",
           f"--memPoolSize=workspace:{options['workspace_mb']}",
           f"--minShapes={name}:{dims(options['shapes']['min'])}",
           f"--optShapes={name}:{dims(options['shapes']['opt'])}",
           f"--maxShapes={name}:{dims(options['shapes']['max'])}"]
    if options["timing_cache"]:
        cmd.append(f"--timingCacheFile={options['timing_cache']}")
    return cmd


def shell_script(options: dict) -> str:
    base = " ".join(shlex.quote(part) for part in trtexec_command(options))
    precision = "--fp16" if options["precision"] == "fp16" else '"${int8_flags[@]}"'
    return f"""#!/usr/bin/env bash
# Builds the TensorRT engine for THIS device from {options['onnx']} (precision {options['precision']}).
# Engines depend on the GPU, the TensorRT version and the driver: build on the target, never copy engines.
# Uses trtexec when it is on PATH, otherwise build_engine.py (TensorRT Python API via Polygraphy).
set -euo pipefail
cd "$(dirname "${{BASH_SOURCE[0]}}")"
if command -v trtexec >/dev/null 2>&1; then
  # INT8 comes from the Q/DQ nodes (explicit quantization): strongly typed where this trtexec supports it.
  if trtexec --help 2>&1 | grep -q -- --stronglyTyped; then int8_flags=(--stronglyTyped); else int8_flags=(--int8 --fp16); fi
  {base} {precision} "$@"
else
  exec python3 {BUILDER_NAME} --options {OPTIONS_NAME} "$@"
fi
"""


def write_build_kit(folder: Path, options: dict) -> list[Path]:
    """tensorrt/build_engine.sh, build_engine.py and build_options.json; returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / OPTIONS_NAME).write_text(json.dumps(options, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(Path(__file__).with_name("trt_builder.py"), folder / BUILDER_NAME)
    (folder / SCRIPT_NAME).write_text(shell_script(options))
    for name in (SCRIPT_NAME, BUILDER_NAME):
        (folder / name).chmod(0o755)
    return [folder / SCRIPT_NAME, folder / BUILDER_NAME, folder / OPTIONS_NAME]


def build_here(folder: Path) -> Path:
    """Build the engine in-process with the kit's own builder (only when availability() says yes)."""
    from . import trt_builder

    return trt_builder.build(trt_builder.load_options(folder / OPTIONS_NAME))
