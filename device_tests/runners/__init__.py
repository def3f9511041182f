"""Runners for every runtime, one interface (see base.Runner). Importing this package imports no runtime."""

from . import executorch, litert, onnxrt, ov, tflm, trt  # noqa: F401  (registers the runners)
from .base import RUNNERS, Runner, default_runtime, get_runner

__all__ = ["RUNNERS", "Runner", "default_runtime", "get_runner"]
