"""One interface for every runtime. A runner is a context manager: entering loads the model, leaving frees it.
Public methods check their arguments and state; the `*_impl` methods of each runtime do the work."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Optional

import numpy as np

from ..errors import DeviceTestError, IncompatibleArtifactError, UnknownRuntimeError

PRECISION_HINTS = ("f32", "bf16", "f16")


@dataclass
class Binding:
    """Buffers bound to the runtime once, for repeated calls at one input shape: write the next input into
    `input`, call `run()`, read the logits from `output` (a view, overwritten by the next run: copy to keep).
    `run` allocates nothing and converts nothing, so a timer around it measures what the runtime's own
    benchmark loop measures. `reported_ms`, where the runtime times its calls itself (OpenVINO), returns its
    figure for the last run."""

    input: np.ndarray
    output: np.ndarray
    run: Callable[[], object]
    reported_ms: Optional[Callable[[], float]] = None
    keep: tuple = ()   # runtime objects the buffers belong to (kept alive with the binding)


class Runner:
    name: ClassVar[str]
    formats: ClassVar[tuple[str, ...]]          # artifact formats it can load
    bundle_formats: ClassVar[tuple[str, ...]]   # formats it runs when validating a bundle
    distribution: ClassVar[str | None] = None   # PyPI distribution version() reports, for runtimes without one
    module: ClassVar[str | None] = None         # what a target must import to have it (default: name)

    def __init__(self, path: Path, fmt: str, threads: int = 1, precision_hint: str = "f32", max_batch: int = 64):
        if fmt not in self.formats:
            raise IncompatibleArtifactError(
                f"The {self.name} runner cannot load {Path(path).name} (format '{fmt}').",
                f"{self.name} runs {', '.join(self.formats)}; pick another --runtime for this file.")
        if precision_hint not in PRECISION_HINTS:
            raise DeviceTestError(f"Unknown precision hint '{precision_hint}'.", f"Use one of {', '.join(PRECISION_HINTS)}.")
        if threads < 0:
            raise DeviceTestError(f"threads is {threads}.", "Use 0 (the runtime's default) or a positive count.")
        self.path = Path(path)
        self.format = fmt
        self.threads = threads
        self.precision_hint = precision_hint
        self.max_batch = max_batch
        self.is_active = False
        self.input_shape: tuple[Optional[int], ...] = ()

    # -- lifecycle ---------------------------------------------------------------------------------------
    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def activate(self) -> None:
        if self.is_active:
            raise RuntimeError(f"{self.name} runner for {self.path.name} is already active")
        if not self.path.is_file():
            raise IncompatibleArtifactError(f"{self.path} does not exist.", "Check the model path.")
        self.available()
        try:
            self._activate_impl()
        except DeviceTestError:
            raise
        except Exception as exc:  # the runtimes raise their own types; the user needs the message, not the class
            first_line = str(exc).strip().splitlines()[0].rstrip(" .") if str(exc).strip() else repr(exc)
            raise IncompatibleArtifactError(
                f"{self.name} could not load {self.path.name}: {first_line}.",
                "Check that the file is a complete, valid model (re-export it) and that this runtime supports its operators.",
            ) from None
        self.is_active = True

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate_impl()
            self.is_active = False

    # -- inference ---------------------------------------------------------------------------------------
    def infer(self, x: np.ndarray) -> np.ndarray:
        """float32 N x C x H x W -> logits N x K (a fresh array, safe to keep)."""
        if not self.is_active:
            raise RuntimeError(f"{self.name} runner is not active: use it inside a `with` block")
        if x.dtype != np.float32 or x.ndim != len(self.input_shape):
            raise IncompatibleArtifactError(
                f"{self.path.name} takes float32 input of rank {len(self.input_shape)}; got {x.dtype} {x.shape}.",
                "Check the preprocessing spec against the model's input.")
        return self._infer_impl(x)

    def bind(self, shape: tuple[int, ...]) -> Binding:
        """Pre-allocated, pre-bound input and output for calls at `shape` (see Binding)."""
        if not self.is_active:
            raise RuntimeError(f"{self.name} runner is not active: use it inside a `with` block")
        shape = tuple(int(d) for d in shape)
        fixed = [d for d in self.input_shape]
        if len(shape) != len(fixed) or any(f is not None and f != d for f, d in zip(fixed, shape)):
            raise IncompatibleArtifactError(
                f"{self.path.name} takes input of shape {fixed}; cannot bind {list(shape)}.",
                "Bind the model's own shape (None marks a free dimension).")
        return self._bind_impl(shape)

    def layer_profile(self, x: np.ndarray, runs: int = 200) -> dict:
        """The runtime's own per-layer timing over `runs` calls on `x` (ONNX Runtime session profiling,
        OpenVINO performance counters, TensorRT's layer profiler), from a separate profiling instance so the
        latency measurement stays unprofiled. See device_tests.layers for the format."""
        if not self.is_active:
            raise RuntimeError(f"{self.name} runner is not active: use it inside a `with` block")
        return self._layer_profile_impl(np.ascontiguousarray(x, dtype=np.float32), max(int(runs), 1))

    def predict(self, x: np.ndarray, rule=None) -> np.ndarray:
        """Top-1 class per input, or -1 (unknown) where the artifact's OOD rule (device_tests.ood.Rule,
        from its artifacts.json entry) rejects it."""
        from ..ood import classify

        return classify(self.infer(x), rule)

    def batch_for(self, wanted: int) -> int:
        """The batch to use: the model's fixed batch if it has one, else `wanted`."""
        fixed = self.input_shape[0] if self.input_shape else None
        return fixed if isinstance(fixed, int) and fixed > 0 else wanted

    def describe(self) -> dict:
        return {"runtime": self.name, "runtime_version": self.version(), "threads": self.threads,
                "precision_hint": self.precision_hint, **self._describe_impl()}

    # -- per runtime -------------------------------------------------------------------------------------
    @classmethod
    def available(cls) -> None:
        """Raise RuntimeUnavailableError (with how to install) when the runtime cannot be imported."""
        raise NotImplementedError

    @classmethod
    def version(cls) -> str:
        if cls.distribution is None:
            raise NotImplementedError
        from importlib.metadata import version

        return version(cls.distribution)

    def _activate_impl(self) -> None:
        raise NotImplementedError

    def _deactivate_impl(self) -> None:
        raise NotImplementedError

    def _infer_impl(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _describe_impl(self) -> dict:
        return {}

    def _bind_impl(self, shape: tuple[int, ...]) -> Binding:
        """Fallback for runtimes without buffer binding: the call converts, the copy into `output` is timed."""
        x = np.zeros(shape, np.float32)
        output = np.array(self._infer_impl(x), copy=True)

        def run():
            output[...] = self._infer_impl(x)
        return Binding(x, output, run)

    def _layer_profile_impl(self, x: np.ndarray, runs: int) -> dict:
        raise DeviceTestError(f"The {self.name} runner has no per-layer profiler.", "Profile this artifact with another runtime.")


RUNNERS: dict[str, type[Runner]] = {}


def register_runner(cls: type[Runner]) -> type[Runner]:
    assert cls.name not in RUNNERS, f"runner {cls.name} registered twice"
    RUNNERS[cls.name] = cls
    return cls


def get_runner(name: str) -> type[Runner]:
    try:
        return RUNNERS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(RUNNERS), n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UnknownRuntimeError(f"Unknown runtime '{name}'.{hint}",
                                  f"Valid runtimes: {', '.join(sorted(RUNNERS))}.") from None


def default_runtime(fmt: str) -> str:
    """The runtime that runs a format natively (`edgesmith profile` without --runtime)."""
    for name in ("onnxruntime", "openvino", "tensorrt", "litert", "executorch"):
        if name in RUNNERS and fmt in RUNNERS[name].bundle_formats:
            return name
    raise IncompatibleArtifactError(f"No runner handles format '{fmt}'.",
                                    "Pass an ONNX, OpenVINO IR, TensorRT engine, .tflite or .pte file.")


def _lazy(module: str, runtime: str, install: str) -> Callable:
    """Import an optional runtime or say how to get it."""
    def load():
        import importlib

        from ..errors import RuntimeUnavailableError

        try:
            return importlib.import_module(module)
        except Exception as exc:  # ImportError, or a broken install raising anything on import
            raise RuntimeUnavailableError(f"The {runtime} runtime is not usable on this machine ({exc}).",
                                          f"Install it ({install}) or choose another --runtime.") from None
    return load
