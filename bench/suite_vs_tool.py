"""Benchmark: the suite's batch-1 model latency against the runtime's own tool, for every artifact of a bundle,
before and after a change of the measuring code, in one run.

For each round and each artifact: `python -m device_tests.measure` from the BEFORE tree (e.g. main's
checkout), the same from the AFTER tree (this one), and the runtime's tool on the same file with the same
threads (benchmark_app -api sync -nstreams 1 -hint none -b 1 for OpenVINO IR; onnxruntime_perf_test / trtexec
where installed), one after another, so load from elsewhere hits all of them alike. Medians over the rounds.
The AFTER suite pins itself to --threads CPUs (device_tests.environment.pin_cpus, `--cpus auto`) and the tool is
run on the same CPUs; `after_unpinned` is the AFTER suite with `--cpus none`, to show what pinning changes.

    flock /work/heavy.lock .venv/bin/python bench/suite_vs_tool.py --bundle builds/fashion_tops/export-KEY \\
        --before /path/to/main --rounds 3
Prints a table and writes bench/results/suite_vs_tool.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from device_tests import tools
from device_tests.bundle import Bundle

RUNTIME = {"onnx": "onnxruntime", "openvino": "openvino"}
RESULTS = ROOT / "bench" / "results" / "suite_vs_tool.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True, help="an export stage folder (artifacts.json, eval.npz)")
    p.add_argument("--before", type=Path, required=True, help="source tree of the code before (its device_tests/)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--min-queries", type=int, default=1024)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measurement (suite and tool alike)")
    p.add_argument("--results", type=Path, default=RESULTS)
    return p.parse_args(argv)


def suite_p50(tree: Path, bundle: Path, artifact: str, runtime: str, args, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "device_tests.measure", "--bundle", str(bundle), "--artifact", artifact,
               "--runtime", runtime, "--threads", str(args.threads), "--min-queries", str(args.min_queries),
               "--min-duration", str(args.duration), *extra, "--out", str(out)]
        env = {**os.environ, "PYTHONPATH": str(tree)}
        subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=900)
        r = json.loads(out.read_text())
    if r.get("status") != "passed":
        raise RuntimeError(f"{tree}: {artifact} {runtime}: {r.get('message')}")
    lat = r["latency"]
    return {"p50_ms": lat["model"]["p50_ms"], "queries": lat["queries"],
            "runtime_reported_p50_ms": lat.get("runtime_reported", {}).get("p50_ms")}


def tool_on_suite_cpus(runtime: str, art, args, shape: tuple[int, ...]) -> dict | None:
    """The runtime's tool with this process pinned the way the AFTER suite pins itself (the tool inherits the
    mask), then the mask restored, so the BEFORE suite still runs as it always did."""
    from device_tests.environment import pinned_cpus

    with pinned_cpus(args.threads, "auto"):
        return tools.run_tool(runtime, art.format, art.path, args.threads, shape, args.duration)


def main(argv=None) -> int:
    args = parse_args(argv)
    bundle = Bundle.load(args.bundle.resolve(), verify=False)
    cases = [(a.file, RUNTIME[a.format], a) for a in bundle.artifacts if a.format in RUNTIME]
    one = (1, *bundle.preprocess(bundle.eval_set().images_u8[:1]).shape[1:])   # the batch-1 input every tool gets
    samples: dict[str, dict[str, list]] = {
        f: {"before": [], "after": [], "after_own": [], "after_unpinned": [], "tool": []} for f, _, _ in cases}
    tool_info: dict[str, dict] = {}
    start = time.time()
    for rnd in range(args.rounds):
        for file, runtime, art in cases:
            samples[file]["before"].append(suite_p50(args.before.resolve(), args.bundle.resolve(), file, runtime, args, [])["p50_ms"])
            after = suite_p50(ROOT, args.bundle.resolve(), file, runtime, args, ["--layer-runs", "0", "--no-tool"])
            samples[file]["after"].append(after["p50_ms"])
            if after["runtime_reported_p50_ms"] is not None:
                samples[file]["after_own"].append(after["runtime_reported_p50_ms"])
            samples[file]["after_unpinned"].append(suite_p50(ROOT, args.bundle.resolve(), file, runtime, args,
                                                             ["--layer-runs", "0", "--no-tool", "--cpus", "none"])["p50_ms"])
            t = tool_on_suite_cpus(runtime, art, args, one)
            tool_info[file] = {k: v for k, v in (t or {}).items() if k != "median_ms"}
            if t and t.get("status") == "measured":
                samples[file]["tool"].append(t["median_ms"])
            print(f"round {rnd + 1}/{args.rounds} {file:<26} before {samples[file]['before'][-1] * 1e3:7.1f} us  "
                  f"after {samples[file]['after'][-1] * 1e3:7.1f} us  tool "
                  f"{samples[file]['tool'][-1] * 1e3 if samples[file]['tool'] else float('nan'):7.1f} us", flush=True)
    rows = {}
    for file, runtime, _ in cases:
        s = {k: float(np.median(v)) if v else None for k, v in samples[file].items()}
        tool = s["tool"]
        rows[file] = {"runtime": runtime, "tool": tool_info[file].get("tool"), "tool_status": tool_info[file].get("status"),
                      "before_p50_us": s["before"] * 1e3, "after_p50_us": s["after"] * 1e3,
                      "after_unpinned_p50_us": s["after_unpinned"] * 1e3,
                      "after_runtime_reported_p50_us": s["after_own"] * 1e3 if s["after_own"] else None,
                      "tool_median_us": tool * 1e3 if tool else None,
                      "before_ratio": s["before"] / tool if tool else None, "after_ratio": s["after"] / tool if tool else None,
                      "after_within_target": (abs(s["after"] - tool) <= max(0.1 * tool, 0.005)) if tool else None,
                      "samples_ms": samples[file]}
    print(f"\n{'artifact':<26}{'runtime':<13}{'before p50':>11}{'unpinned':>10}{'after p50':>11}{'own timer':>10}{'tool median':>13}"
          f"{'before x':>10}{'after x':>9}  within 10 %/5 us")
    for file, r in rows.items():
        fmt = (lambda v, w=11: f"{v:>{w}.1f}" if v is not None else f"{'n/a':>{w}}")
        ratio = (lambda v: f"{v:>9.2f}" if v is not None else f"{'n/a':>9}")
        print(f"{file:<26}{r['runtime']:<13}{fmt(r['before_p50_us'])}{fmt(r['after_unpinned_p50_us'], 10)}"
              f"{fmt(r['after_p50_us'])}{fmt(r['after_runtime_reported_p50_us'], 10)}{fmt(r['tool_median_us'], 13)}"
              f"{ratio(r['before_ratio']):>10}{ratio(r['after_ratio'])}  "
              f"{'yes' if r['after_within_target'] else 'NO' if r['after_within_target'] is False else r['tool'] + ': ' + str(r['tool_status'])}")
    print("(microseconds; x = suite p50 / tool median; medians over rounds; own timer = the runtime's timing of the "
          "suite's calls, what benchmark_app's median is made of)")
    from device_tests.environment import environment

    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"bundle": str(args.bundle), "before": str(args.before), "rounds": args.rounds,
                                        "threads": args.threads, "duration_s": args.duration,
                                        "wall_s": round(time.time() - start, 1), "environment": environment(),
                                        "artifacts": rows}, indent=2) + "\n")
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
