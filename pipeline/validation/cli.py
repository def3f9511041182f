"""`edgesmith profile MODEL`: the trtexec / benchmark_app of edgesmith. The same latency protocol (and, with
an evaluation set, the same accuracy) as the validate stage, for any model file a device-suite runtime can load
(ONNX, OpenVINO IR, TensorRT engine, LiteRT / TFLite Micro .tflite, ExecuTorch .pte), built by edgesmith or not,
locally or on an SSH target, with no config file."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path, PurePosixPath
from typing import Optional

import typer

from device_tests.bundle import FORMATS as MODEL_SUFFIXES
from device_tests.runners import RUNNERS

from ..cache import PROJECT_ROOT
from ..errors import ConfigError, DeviceError
from .config import LatencyConfig, SshConfig, ValidateConfig
from .targets import parse_target


def profile(
    model: Path = typer.Argument(..., help="model file: " + ", ".join(sorted(MODEL_SUFFIXES)) + " (an OpenVINO .xml "
                                 "with its .bin)"),
    runtime: Optional[str] = typer.Option(None, help=" | ".join(sorted(RUNNERS)) + " (default: by file type; "
                                          "--runtime tflm runs a .tflite under TFLite Micro)"),
    target: str = typer.Option("local", help="'local' or ssh://user@host[:port][?python=/path/to/python]"),
    eval_set: Optional[Path] = typer.Option(None, "--eval",
                                            help="eval.npz (images_u8, labels; teacher_pred, fp32_pred) for accuracy"),
    threads: int = typer.Option(1, help="runtime threads (0: the runtime's default)"),
    queries: int = typer.Option(1024, help="minimum timed queries at batch 1"),
    duration: float = typer.Option(2.0, help="minimum timed seconds at batch 1 (and for throughput)"),
    warmup: int = typer.Option(50, help="discarded warm-up queries"),
    batch: int = typer.Option(64, help="batch size for the throughput measurement"),
    shape: Optional[str] = typer.Option(None, help="input shape N,C,H,W when the model's is dynamic"),
    precision_hint: str = typer.Option("f32", help="OpenVINO inference precision: f32 | bf16 | f16"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the full measurement as JSON"),
    ssh_key: Optional[str] = typer.Option(None, help="private key for an SSH target"),
    known_hosts: Optional[str] = typer.Option(None, help="known_hosts for an SSH target (default ~/.ssh/known_hosts)"),
    ssh_python: str = typer.Option("python3", help="Python on the SSH target"),
    layers: int = typer.Option(10, help="slowest layers to print from the runtime's profiler (0: none)"),
    layer_runs: int = typer.Option(200, help="calls profiled per layer (0: no per-layer profile)"),
    tool: bool = typer.Option(True, help="also run the runtime's own benchmark tool (benchmark_app, trtexec, "
                                         "onnxruntime_perf_test) where installed, and show both figures"),
    compare: Optional[Path] = typer.Option(None, help="an INT8 ONNX of MODEL (an FP32 ONNX): print the per-layer "
                                                      "quantization error (SQNR, cosine), worst first, and stop"),
    images: int = typer.Option(256, help="with --compare: images (from --eval, else random) the error is measured on"),
) -> None:
    """Measure latency (p50/p90/p99, throughput, peak memory, per-layer time) and, with --eval, accuracy of any
    model file; with --compare INT8.onnx, the per-layer INT8 error against MODEL instead."""
    if compare is not None:
        rows = run_compare(model, compare, eval_set, images, shape)
        print_layer_error(rows, model, compare)
        if json_out:
            json_out.write_text(json.dumps({"fp32": str(model), "int8": str(compare), "layers": rows}, indent=1))
        return
    result = run_profile(model, runtime, target, eval_set, threads, LatencyConfig(
        min_queries=queries, min_duration_s=duration, warmup=warmup, throughput_batch=batch), shape, precision_hint,
        SshConfig(python=ssh_python, key_file=ssh_key, known_hosts=known_hosts), layer_runs=layer_runs, tool=tool)
    print_result(result, layers)
    if json_out:
        json_out.write_text(json.dumps(result, indent=1))


def run_compare(fp32: Path, int8: Path, eval_set: Optional[Path], images: int, shape: Optional[str]) -> list[dict]:
    """Per-layer error of an FP32 / INT8 ONNX pair on eval images (preprocessed with the bundle's spec if one
    is next to them) or on random inputs of the model's shape."""
    from quantize.errors import QuantizationError
    from quantize.layer_error import onnx_layer_error

    for path in (fp32, int8):
        if not Path(path).is_file() or Path(path).suffix != ".onnx":
            raise ConfigError(f"{path} is not an ONNX file.", "--compare takes an FP32 .onnx (MODEL) and its INT8 .onnx.")
    try:
        x = _compare_inputs(fp32, eval_set, images, shape)
        return onnx_layer_error(fp32, int8, x)
    except (QuantizationError, ConfigError):
        raise
    except Exception as exc:  # noqa: BLE001 (onnx / onnxruntime raise their own types on bad files)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"Could not compare {fp32.name} with {int8.name}: {first}",
                          "Pass two valid ONNX files of the same model (FP32 first, then its INT8 Q/DQ export).") from None


def _compare_inputs(model: Path, eval_set: Optional[Path], images: int, shape: Optional[str]):
    import numpy as np
    import onnx

    if eval_set is not None:
        from device_tests.bundle import EvalSet
        from device_tests.preprocess import Preprocess

        raw = EvalSet.load(eval_set).images_u8[:images]
        spec = _spec_near(model, eval_set)
        if spec:
            return Preprocess.from_spec(json.loads(spec))(raw)
        return np.ascontiguousarray(raw, dtype=np.float32) / 255.0
    graph = onnx.load(str(model), load_external_data=False).graph
    dims = [d.dim_value or None for d in graph.input[0].type.tensor_type.shape.dim]
    if shape:
        dims = [int(v) for v in shape.split(",")]
    if any(d is None for d in dims[1:]):
        raise ConfigError(f"{model.name} has dynamic dimensions beyond the batch.", "Pass --shape N,C,H,W or --eval.")
    return np.random.default_rng(0).standard_normal((images, *dims[1:])).astype(np.float32)


def print_layer_error(rows: list[dict], fp32: Path, int8: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"per-layer INT8 error: {int8.name} vs {fp32.name} (worst first)")
    for col in ("layer", "op", "quantized", "SQNR dB", "cosine", "lost here dB", "max |err|"):
        table.add_column(col, justify="left" if col in ("layer", "op", "quantized") else "right")
    for r in rows:
        table.add_row(r["layer"], r["op"], "yes" if r["quantized"] else "no", f"{r['sqnr_db']:.2f}", f"{r['cosine']:.5f}",
                      f"{r['added_db']:.2f}" if r.get("added_db") is not None else "", f"{r['max_abs_error']:.3g}")
    Console().print(table)


def run_profile(model: Path, runtime: Optional[str], target: str, eval_set: Optional[Path], threads: int,
                latency: LatencyConfig, shape: Optional[str] = None, precision_hint: str = "f32",
                ssh: SshConfig = SshConfig(), layer_runs: int = 200, tool: bool = True) -> dict:
    from device_tests.bundle import format_of
    from device_tests.errors import DeviceTestError
    from device_tests.runners import default_runtime, get_runner

    model = Path(model)
    if not model.is_file():
        raise ConfigError(f"Model file {model} does not exist.", "Pass the path of an .onnx, .xml or .engine file.")
    try:
        fmt = format_of(model)
        runtime = runtime or default_runtime(fmt)
        if fmt not in get_runner(runtime).formats:
            raise ConfigError(f"The {runtime} runtime cannot run {model.name} ({fmt}).",
                              f"{runtime} runs {', '.join(get_runner(runtime).formats)} files; pick another --runtime.")
    except DeviceTestError as exc:
        raise ConfigError(exc.problem, exc.fix) from None
    try:
        parsed = parse_target(target)
    except ValueError as exc:
        raise ConfigError(f"--target: {exc}.", "Use 'local' or ssh://user@host[:port].") from None
    if eval_set is not None and not eval_set.is_file():
        raise ConfigError(f"Evaluation set {eval_set} does not exist.", "Pass an eval.npz (images_u8, labels).")
    cfg = ValidateConfig(targets=[target], runtimes=[runtime], threads=threads, precision_hint=precision_hint,
                         latency=latency, ssh=ssh)
    files = _model_files(model, fmt) + ([(eval_set, PurePosixPath("eval.npz"))] if eval_set else [])
    args = _measure_args(model, runtime, eval_set, cfg, shape, _spec_near(model, eval_set))
    args += ["--layer-runs", str(layer_runs)] + ([] if tool else ["--no-tool"])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "profile.json"
        if parsed.kind == "local":
            local = [a.replace("@/", "", 1) if a.startswith("@/") else a for a in _localise(args, files)]
            log = _run_local_measure([sys.executable, "-m", "device_tests.measure", *local, "--out", str(out)],
                                     cfg.ssh.command_timeout_s)
        else:
            from .ssh import run_measure_ssh

            log = run_measure_ssh(parsed, cfg, files, args, runtime, out)[1]
        result = _read_result(out, log)
    if result.get("status") != "passed":
        raise DeviceError(f"Profiling {model.name} with {runtime} on {target} failed: {result.get('message')}",
                          "`--runtime` picks another runtime.")
    result["target"] = target
    return result


def _run_local_measure(args: list[str], timeout: float) -> str:
    """The measurement subprocess, bounded in time; its output is kept for the error message."""
    try:
        proc = subprocess.run(args, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DeviceError(f"The measurement did not finish within {timeout:.0f} s.",
                          "Lower --queries / --duration, or check that the runtime does not hang on this model.") from None
    return proc.stdout + proc.stderr


def _read_result(out: Path, log: str) -> dict:
    try:
        result = json.loads(out.read_text())
    except (OSError, ValueError):
        tail = " | ".join(line for line in log.strip().splitlines()[-8:] if line.strip())
        return {"status": "error", "message": f"no result written ({tail or 'no output'})"}
    return result if isinstance(result, dict) else {"status": "error", "message": "the result is not a JSON object"}


def _model_files(model: Path, fmt: str) -> list[tuple[Path, PurePosixPath]]:
    files = [(model, PurePosixPath("model", model.name))]
    if fmt == "openvino" and model.with_suffix(".bin").is_file():
        files.append((model.with_suffix(".bin"), PurePosixPath("model", model.with_suffix(".bin").name)))
    return files


def _spec_near(model: Path, eval_set: Optional[Path]) -> Optional[str]:
    """The preprocessing spec of an edgesmith bundle next to the model or the eval set, if there is one."""
    if eval_set is None:
        return None
    for folder in (eval_set.parent, model.parent, model.parent.parent):
        meta = folder / "artifacts.json"
        if meta.is_file():
            try:
                data = json.loads(meta.read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{meta} (next to the model or the eval set) is not valid JSON ({exc}).",
                                  "Restore it from the bundle (`edgesmith verify` finds damaged files), or move "
                                  "the model and eval.npz out of that folder.") from None
            if not isinstance(data, dict):
                raise ConfigError(f"{meta} (next to the model or the eval set) is not a JSON object.",
                                  "Restore it from the bundle, or move the model and eval.npz out of that folder.")
            spec = next((data[k] for k in ("preprocessing", "preprocess", "input") if isinstance(data.get(k), dict)), None)
            if spec:
                return json.dumps(spec)
    return None


def _measure_args(model: Path, runtime: str, eval_set: Optional[Path], cfg: ValidateConfig, shape, spec) -> list[str]:
    lat = cfg.latency
    args = ["--model", f"@/model/{model.name}", "--runtime", runtime, "--threads", str(cfg.threads),
            "--precision-hint", cfg.precision_hint, "--min-queries", str(lat.min_queries),
            "--min-duration", str(lat.min_duration_s), "--warmup", str(lat.warmup),
            "--throughput-batch", str(lat.throughput_batch)]
    if eval_set is not None:
        args += ["--eval", "@/eval.npz"]
    if spec:
        args += ["--spec", spec]
    if shape:
        args += ["--shape", shape]
    return args


def _localise(args: list[str], files: list[tuple[Path, PurePosixPath]]) -> list[str]:
    """Map the remote-relative '@/...' paths back to the local files."""
    where = {f"@/{rel}": str(local.resolve()) for local, rel in files}
    return [where.get(a, a) for a in args]


def print_result(r: dict, layers: int = 10) -> None:
    from rich.console import Console
    from rich.table import Table

    lat, tp = r["latency"], r["throughput"]
    table = Table(title=f"{r['artifact']} · {r['runtime']} {r['runtime_version']} · {r['target']} · "
                        f"{r['threads']} thread(s) · precision hint {r['precision_hint']}")
    for col in ("", "p50 ms", "p90 ms", "p99 ms", "mean ms", "std ms", "n"):
        table.add_column(col, justify="right" if col else "left")
    for name in ("model", "preprocess", "model_in_pipeline", "postprocess", "end_to_end"):
        s = lat.get(name)
        if s is None:
            continue
        table.add_row(name, *(f"{s[k]:.4f}" for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms")), str(s["n"]))
    console = Console()
    console.print(table)
    env = r["environment"]
    console.print(f"throughput: {tp['images_per_s']:,.0f} img/s at batch {tp['batch']} · peak RSS {r['peak_rss_mb']:.1f} MiB "
                  f"· load {r['load_s']:.2f} s · {env['cpu_model']} ({env['usable_cores']} usable cores)")
    if "accuracy" in r:
        a = r["accuracy"]
        keys = ("agreement_teacher", "agreement_fp32", "agreement_int8")
        extra = "".join(f" · agreement with {k.split('_')[1]} {a[k]:.4f}" for k in keys if k in a)
        console.print(f"accuracy: top-1 {a['top1']:.4f} on {a['n']} images{extra}")
    _print_tool(console, r)
    if layers and (r.get("layers") or {}).get("layers"):
        _print_layers(console, r["layers"], layers)
    elif (r.get("layers") or {}).get("error"):
        console.print(f"per-layer profile: {r['layers']['error']}")
    if r.get("synthetic_input"):
        console.print("(random input of the model's shape; pass --eval for accuracy and real images)")


def _print_tool(console, r: dict) -> None:
    tool, cmp_ = r.get("tool") or {}, r.get("tool_comparison")
    reported = r["latency"].get("runtime_reported", {}).get("p50_ms")
    line = f"model p50 {r['latency']['model']['p50_ms'] * 1000:.1f} us"
    if reported is not None:
        line += f" · the runtime's own timing of the same calls p50 {reported * 1000:.1f} us"
    if cmp_:
        line += (f" · {tool['tool']} median {cmp_['tool_median_ms'] * 1000:.1f} us (ratio {cmp_['ratio']:.2f}, "
                 f"{'within' if cmp_['agrees'] else 'OUTSIDE'} 10 % / 5 us)")
    elif tool:
        line += f" · {tool.get('tool')}: {tool.get('status')}{': ' + tool['message'] if tool.get('message') else ''}"
    console.print(line)


def _print_layers(console, prof: dict, n: int) -> None:
    from rich.table import Table

    table = Table(title=f"slowest layers ({prof['runtime']} profiler, {prof['runs']} calls, "
                        f"{prof['layers_executed']} layers executed, total {prof['total_ms'] * 1000:.1f} us profiled)")
    for col in ("layer", "op", "kernel", "precision", "mean us", "share"):
        table.add_column(col, justify="right" if col in ("mean us", "share") else "left")
    for layer in prof["layers"][:n]:
        table.add_row(layer["name"], layer["op"], layer["kernel"], layer["precision"], f"{layer['mean_ms'] * 1000:.2f}",
                      f"{layer['share']:.1%}")
    console.print(table)
