"""Measure one model with one runtime in this process: load, accuracy on the evaluation set, single-stream
latency, throughput, peak memory, environment. The suite runs each artifact in a fresh process
(`python -m device_tests.measure ...`) so that peak RSS belongs to that artifact alone.

    python -m device_tests.measure --bundle B --artifact model.onnx --runtime onnxruntime --out r.json
    python -m device_tests.measure --model any.onnx [--eval eval.npz] [--shape 1,3,224,224] --out r.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import accuracy, latency, ood, tools
from .bundle import Artifact, Bundle, EvalSet, check_artifact
from .environment import current_rss_mb, environment, peak_rss_mb, pinned_cpus
from .errors import BundleError, DeviceTestError, IncompatibleArtifactError, RuntimeUnavailableError
from .latency import LatencySettings
from .preprocess import Preprocess
from .runners import get_runner

SYNTHETIC_IMAGES = 32
EXIT_SKIPPED = 3
EXIT_ERROR = 2


def measure(artifact: Artifact, runtime: str, settings: LatencySettings, threads: int = 1,
            precision_hint: str = "f32", eval_set: Optional[EvalSet] = None, preprocess: Optional[Preprocess] = None,
            shape: Optional[tuple[int, ...]] = None, layer_runs: int = 200, run_tool: bool = True) -> dict:
    """`layer_runs`: calls profiled per layer (0: no per-layer profile); `run_tool`: also run the runtime's own
    benchmark tool on the artifact (where installed) and record both figures."""
    runner_cls = get_runner(runtime)
    baseline_mb = current_rss_mb()
    start = time.perf_counter()
    with runner_cls(artifact.path, artifact.format, threads, precision_hint, settings.throughput_batch) as runner:
        load_s = time.perf_counter() - start
        raw, prep = _inputs(runner, eval_set, preprocess, shape)
        result = {"artifact": artifact.file, "format": artifact.format, "precision": artifact.precision,
                  "size_bytes": artifact_size(artifact), "load_s": load_s, **runner.describe(),
                  "input_shape": [d for d in runner.input_shape], "synthetic_input": eval_set is None}
        rule = ood.Rule.from_dict(artifact.extra.get("ood"))  # None: no unknown answer for this artifact
        # Latency first, in a process that has run nothing else yet: after the batched accuracy pass OpenVINO's
        # batch-1 calls measured ~4 us slower (its own timing too) on the small students.
        one = (1, *prep(raw[:1]).shape[1:])
        result["latency"] = latency.single_stream(runner.bind(one), prep, raw, settings, ood.postprocessor(rule))
        if eval_set is not None:
            result["accuracy"] = _accuracy(runner, eval_set, prep, settings)
            if rule is not None and eval_set.ood_images_u8 is not None:
                result["ood"] = _ood(runner, eval_set, prep, settings, rule)
        batch = prep(_tile(raw, runner.batch_for(settings.throughput_batch)))
        result["throughput"] = latency.throughput(runner.bind(batch.shape), batch, settings)
        if layer_runs:
            result["layers"] = _layers(runner, prep(raw[:1]), layer_runs)
    result.update(peak_rss_mb=peak_rss_mb(), baseline_rss_mb=baseline_mb)
    if run_tool:  # after the peak RSS is read: the tool is another process, but keep the order obvious
        result["tool"] = tools.run_tool(runtime, artifact.format, artifact.path, threads, one,
                                        settings.min_duration_s, precision_hint)
        result["tool_comparison"] = tools.comparison(result["latency"]["model"]["p50_ms"], result["tool"])
    return result


def _layers(runner, x: np.ndarray, runs: int) -> dict:
    """The runtime's per-layer profile, or why there is none (a profiler failure must not lose the latency)."""
    try:
        return runner.layer_profile(x, runs)
    except DeviceTestError as exc:
        return {"runtime": runner.name, "error": str(exc), "layers": []}
    except Exception as exc:  # noqa: BLE001 (the runtimes raise their own types)
        return {"runtime": runner.name, "error": f"{type(exc).__name__}: {exc}", "layers": []}


def artifact_size(artifact: Artifact) -> int:
    """Bytes on disk, with the weights file of an OpenVINO IR."""
    weights = artifact.path.with_suffix(".bin")
    extra = weights.stat().st_size if artifact.format == "openvino" and weights.is_file() else 0
    return artifact.path.stat().st_size + extra


def _accuracy(runner, eval_set: EvalSet, prep: Callable, settings: LatencySettings) -> dict:
    logits = accuracy.predict(runner.infer, prep(eval_set.images_u8), runner.batch_for(settings.throughput_batch))
    if logits.ndim != 2 or not np.isfinite(logits).all():
        raise IncompatibleArtifactError(
            f"{runner.path.name} returned {'non-finite values' if logits.ndim == 2 else f'shape {logits.shape}'} "
            "on the evaluation set.", "The model must output finite logits N x classes; check the export.")
    num_classes = max(logits.shape[1], int(eval_set.labels.max()) + 1)
    scores = accuracy.scores(logits.argmax(1), eval_set.labels, num_classes, eval_set.teacher_pred, eval_set.fp32_pred,
                             eval_set.int8_pred)
    return {**scores, **accuracy.reference(eval_set.labels, eval_set.teacher_pred, eval_set.fp32_pred, eval_set.int8_pred),
            "num_outputs": int(logits.shape[1]), "logits": accuracy.encode_logits(logits)}


def _ood(runner, eval_set: EvalSet, prep: Callable, settings: LatencySettings, rule: "ood.Rule") -> dict:
    """The shipped rule on this runtime: in-subtask eval images against the out-of-subtask ones."""
    batch = runner.batch_for(settings.throughput_batch)
    in_logits = accuracy.predict(runner.infer, prep(eval_set.images_u8), batch)
    out_logits = accuracy.predict(runner.infer, prep(eval_set.ood_images_u8), batch)
    pred = ood.classify(np.concatenate([in_logits, out_logits]), rule)
    return {**ood.evaluate(in_logits, eval_set.labels, out_logits, rule),
            "unknown_predictions": int((pred == ood.UNKNOWN).sum()), "predictions": int(len(pred))}


def _inputs(runner, eval_set, preprocess, shape):
    """Raw uint8 images to cycle through, and the pre-processing that turns them into the model's input."""
    model_shape = tuple(shape) if shape else runner.input_shape
    if eval_set is not None:
        raw = eval_set.images_u8
        if preprocess is None:  # a bare model with an eval set: size from the model, no normalisation
            size, channels = model_shape[-1] or raw.shape[-1], model_shape[1] or raw.shape[1]
            preprocess = Preprocess(size, channels, (0.0,) * channels, (1.0,) * channels)
        return raw, preprocess
    if any(d is None for d in model_shape[1:]):
        raise IncompatibleArtifactError(
            f"{runner.path.name} has input shape {list(model_shape)} with dynamic dimensions beyond the batch.",
            "Pass --shape N,C,H,W (e.g. 1,3,224,224), or an evaluation set and its preprocessing spec.")
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (SYNTHETIC_IMAGES, *model_shape[1:]), dtype=np.uint8)
    return raw, lambda images: np.ascontiguousarray(images, dtype=np.float32) * np.float32(1 / 255)


def _tile(raw: np.ndarray, n: int) -> np.ndarray:
    return raw[np.arange(n) % len(raw)]


# -- command line (the suite and `edgesmith profile` call this in a fresh process) ------------------------

def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m device_tests.measure", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", type=Path, help="bundle folder (with --artifact)")
    src.add_argument("--model", type=Path, help="any ONNX / OpenVINO IR / TensorRT engine file")
    p.add_argument("--artifact", help="file name of the artifact inside the bundle, as in artifacts.json")
    p.add_argument("--runtime", required=True)
    p.add_argument("--eval", type=Path, help="eval.npz for a bare --model")
    p.add_argument("--spec", help="preprocessing spec as JSON, for a bare --model")
    p.add_argument("--shape", help="input shape N,C,H,W for a model with dynamic dimensions")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision-hint", default="f32")
    p.add_argument("--min-queries", type=int, default=1024)
    p.add_argument("--min-duration", type=float, default=2.0)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--throughput-batch", type=int, default=64)
    p.add_argument("--layer-runs", type=int, default=200, help="calls profiled per layer (0: no per-layer profile)")
    p.add_argument("--cpus", default="auto",
                   help="CPUs to pin this process (and the runtime's tool) to: auto (the last --threads CPUs), none, "
                        "or a list like 2,3")
    p.add_argument("--no-tool", action="store_true", help="do not run the runtime's own benchmark tool")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def _load(args):
    if args.bundle is not None:
        bundle = Bundle.load(args.bundle, verify=False)  # only this artifact must be intact to measure it
        match = [a for a in bundle.artifacts if a.file == args.artifact]
        if not match:
            raise DeviceTestError(f"The bundle has no artifact '{args.artifact}'.",
                                  f"Artifacts: {', '.join(a.file for a in bundle.artifacts)}.")
        problems = check_artifact(match[0])
        if problems:
            raise BundleError(f"{args.artifact} cannot be validated: {'; '.join(problems)}.",
                              "Copy the bundle again from the build output (or re-run the export stage).")
        return match[0], bundle.eval_set(), bundle.preprocess, None
    artifact = Artifact.from_path(args.model)
    eval_set = EvalSet.load(args.eval) if args.eval else None
    spec = Preprocess.from_spec(json.loads(args.spec)) if args.spec else None
    shape = tuple(int(v) for v in args.shape.split(",")) if args.shape else None
    return artifact, eval_set, spec, shape


def _pin(args, scope: ExitStack) -> Optional[list[int]]:
    """Pinned until `scope` closes; main() also runs in-process, and its caller gets its CPUs back."""
    try:
        return scope.enter_context(pinned_cpus(args.threads, args.cpus))
    except ValueError as exc:
        raise DeviceTestError(f"--cpus: {exc}.", "Pass --cpus auto, none, or CPUs this process may use.") from None


def write_json(path: Path, data: dict) -> None:
    """Temp file + rename: a reader never sees half a result."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    os.replace(tmp, path)


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    settings = LatencySettings(args.min_queries, args.min_duration, args.warmup, args.throughput_batch)
    with ExitStack() as scope:
        try:
            pinned = _pin(args, scope)
            artifact, eval_set, spec, shape = _load(args)
            result = measure(artifact, args.runtime, settings, args.threads, args.precision_hint, eval_set, spec, shape,
                             args.layer_runs, not args.no_tool)
            result.update(status="passed", settings=settings.to_dict(),
                          environment={**environment(), "pinned_cpus": pinned})
            code = 0
        except DeviceTestError as exc:
            skipped = isinstance(exc, RuntimeUnavailableError)
            result = {"artifact": args.artifact or (args.model and args.model.name), "runtime": args.runtime,
                      "status": "skipped" if skipped else "error", "error_type": type(exc).__name__,
                      "message": str(exc)}
            print(str(exc), file=sys.stderr)
            code = EXIT_SKIPPED if skipped else EXIT_ERROR
    write_json(args.out, result)
    return code


if __name__ == "__main__":
    sys.exit(main())
