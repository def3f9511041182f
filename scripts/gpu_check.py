"""The Python half of gpu_check.sh (copied beside it into the bundle by scripts/prepare_gpu_bundle.py):

  verify BUNDLE              every file bundle.json lists is there with its sha256
  field BUNDLE_JSON NAME     one top-level field of bundle.json
  link-parent VENV           make VENV see the packages of the venv this interpreter runs in (if it is one)
  report ...                 the table of stage times and accuracies (GPU beside CPU), the determinism check, the JSON

Uses the standard library only, except `report`, which runs edgesmith builds through the CLI.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import site
import subprocess
import sys
import time
from pathlib import Path

STAGES = ("teacher", "adapt", "distill", "qat")
# (label, stage, metric): the accuracies compared, all on the subtask's test images.
ACCURACIES = (
    ("teacher, test", "adapt", "teacher_subtask_test_acc"),
    ("teacher, test (distill's view)", "distill", "teacher_test_acc"),
    ("student FP32, test", "distill", "student_test_acc"),
    ("student FP32, best val", "distill", "best_val_acc"),
    ("student INT8, test", "qat", "int8_test_acc"),
)
DETERMINISM_EPOCHS = 2
NONDETERMINISTIC = re.compile(r"(\w[\w.:]*) does not have a deterministic implementation")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(bundle: Path) -> int:
    meta = json.loads((bundle / "bundle.json").read_text())
    bad = [f["path"] for f in meta["files"]
           if not (bundle / f["path"]).is_file() or (bundle / f["path"]).stat().st_size != f["size"]
           or sha256(bundle / f["path"]) != f["sha256"]]
    for path in bad:
        print(f"missing or changed: {path}", file=sys.stderr)
    return 1 if bad else 0


def link_parent(venv: Path) -> int:
    if sys.prefix == sys.base_prefix:
        return 0          # a plain interpreter: --system-site-packages already shows its packages
    targets = list(venv.glob("lib/python*/site-packages"))
    if not targets:
        print(f"no site-packages folder in {venv}", file=sys.stderr)
        return 1
    (targets[0] / "_gpu_check_parent.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    print(f"{venv} also sees {', '.join(site.getsitepackages())}")
    return 0


def stage_metas(build_root: Path) -> dict[str, dict]:
    """stage.json of each checked stage in a build folder (the newest, if a stage was built more than once)."""
    found = {}
    for stage in STAGES:
        metas = sorted(build_root.glob(f"{stage}-*/stage.json"), key=lambda p: p.stat().st_mtime)
        if metas:
            found[stage] = json.loads(metas[-1].read_text())
    return found


def cli(args: list[str], log: Path) -> int:
    with open(log, "w") as f:
        return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], stdout=f, stderr=subprocess.STDOUT).returncode


def determinism(config: str, build_root: Path, work: Path) -> dict:
    """The docs' CUDA claim: on one GPU (same CUDA, cuDNN and torch), two runs of a stage give the same bytes.
    Checked on the distill stage, shortened to DETERMINISM_EPOCHS epochs, twice from the same adapted teacher."""
    if "adapt" not in stage_metas(build_root):
        return {"checked": False, "reason": "the CUDA build has no adapt stage to start from"}
    runs, start = [], time.perf_counter()
    for n in (1, 2):
        out = work / f"determinism-{n}"
        target = out / build_root.name
        target.mkdir(parents=True, exist_ok=True)
        for stage in ("teacher", "adapt"):
            for folder in build_root.glob(f"{stage}-*"):
                shutil.copytree(folder, target / folder.name, dirs_exist_ok=True)
        log = work / "logs" / f"determinism-{n}.log"
        rc = cli(["build", config, "--until", "distill", "--set", "build.device=cuda", "--set", f"build.output={out}",
                  "--set", f"distill.epochs={DETERMINISM_EPOCHS}"], log)
        distill = stage_metas(target).get("distill")
        student = next(target.glob("distill-*/student.pt"), None)
        runs.append({"rc": rc, "student_sha256": sha256(student) if student else None,
                     "history": distill["metrics"]["history"] if distill else None,
                     "amp": distill["metrics"].get("amp") if distill else None,
                     "nondeterministic_ops": sorted(set(NONDETERMINISTIC.findall(log.read_text())))})
    digests = {r["student_sha256"] for r in runs}
    same = all(r["rc"] == 0 for r in runs) and len(digests) == 1 and None not in digests
    return {"checked": True, "claim": "two runs of the distill stage on one GPU give the same student.pt bytes",
            "epochs": DETERMINISM_EPOCHS, "CUBLAS_WORKSPACE_CONFIG_in_environment": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            "same_bytes": bool(same), "same_history": runs[0]["history"] == runs[1]["history"], "runs": runs,
            "seconds": round(time.perf_counter() - start, 1)}


def fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def comparison(reference: dict, gpu: dict[str, dict]) -> tuple[list[dict], list[dict]]:
    cpu = reference.get("stages", {})
    times = []
    for stage in STAGES:
        c, g = cpu.get(stage, {}), gpu.get(stage, {})
        ct, gt = c.get("wall_time_s"), g.get("wall_time_s")
        times.append({"stage": stage, "cpu_s": ct, "gpu_s": gt, "speedup": round(ct / gt, 2) if ct and gt else None,
                      "same_code": (c.get("code") == g.get("code")) if c and g else None})
    accuracies = [{"what": label, "stage": stage, "metric": metric,
                   "cpu": cpu.get(stage, {}).get("metrics", {}).get(metric),
                   "gpu": gpu.get(stage, {}).get("metrics", {}).get(metric)} for label, stage, metric in ACCURACIES]
    return times, accuracies


def print_tables(times: list[dict], accuracies: list[dict], reference: dict, device: str) -> None:
    print(f"\nstage times (s): CPU = {reference.get('cpu', '?')}, {reference.get('threads', '?')} threads, torch "
          f"{reference.get('torch', '?')}; GPU = {device}")
    print(f"{'stage':<10}{'CPU s':>10}{'GPU s':>10}{'speed-up':>10}  same code")
    for r in times:
        print(f"{r['stage']:<10}{fmt(r['cpu_s'], 1):>10}{fmt(r['gpu_s'], 1):>10}{fmt(r['speedup'], 1):>10}  "
              f"{fmt(r['same_code'])}")
    print(f"\n{'accuracy':<34}{'CPU':>8}{'GPU':>8}")
    for r in accuracies:
        print(f"{r['what']:<34}{fmt(r['cpu']):>8}{fmt(r['gpu']):>8}")


def report(args) -> int:
    bundle, work = Path(args.bundle), Path(args.work)
    reference = json.loads((bundle / "cpu_reference.json").read_text())
    meta = json.loads((bundle / "bundle.json").read_text())
    import torch

    build_root = work / "builds" / reference_build_name(args.config)
    gpu = stage_metas(build_root)
    times, accuracies = comparison(reference, gpu)
    device = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    print_tables(times, accuracies, reference, device)
    det = determinism(args.config, build_root, work) if args.build_rc == 0 else {"checked": False,
                                                                                    "reason": "the CUDA build failed"}
    if det.get("checked"):
        print(f"\ndeterminism ({det['claim']}, {det['epochs']} epochs): "
              f"{'holds' if det['same_bytes'] else 'DOES NOT HOLD'}; nondeterministic ops torch warned about: "
              f"{', '.join(sorted({op for r in det['runs'] for op in r['nondeterministic_ops']})) or 'none'}")
    tests_log = work / "logs" / "tests.log"
    summary = tests_log.read_text().strip().splitlines()[-1] if tests_log.exists() and tests_log.read_text().strip() else ""
    amp = gpu.get("distill", {}).get("metrics", {}).get("amp")
    passed = args.tests_rc == 0 and args.build_rc == 0 and bool(det.get("same_bytes")) and amp is True
    result = {
        "passed": passed, "gpu": args.gpu, "device": device, "bundle": {k: meta.get(k) for k in ("commit", "dirty", "python")},
        "cuda_tests": {"rc": args.tests_rc, "summary": summary},
        "build": {"rc": args.build_rc, "seconds": args.build_s, "config": args.config, "amp": amp,
                  "stages": {s: {"wall_time_s": m.get("wall_time_s"), "device": m.get("device"), "key": m.get("key"),
                                 "metrics": {k: v for k, v in m.get("metrics", {}).items() if isinstance(v, (int, float))}}
                             for s, m in gpu.items()}},
        "times": times, "accuracies": accuracies, "cpu_reference": reference, "determinism": det,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nCUDA tests: {summary or 'no summary'} (rc {args.tests_rc}); build rc {args.build_rc}; AMP in distill: {amp}")
    print(f"gpu_check: {'every check passed' if passed else 'a check FAILED'}; results in {args.out}")
    return 0 if passed else 1


def reference_build_name(config: str) -> str:
    from pipeline.config import load_config

    return load_config(config).build.name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("verify").add_argument("bundle", type=Path)
    field = sub.add_parser("field")
    field.add_argument("path", type=Path)
    field.add_argument("name")
    sub.add_parser("link-parent").add_argument("venv", type=Path)
    rep = sub.add_parser("report")
    for name in ("--bundle", "--work", "--config", "--gpu", "--out", "--build-s"):
        rep.add_argument(name, required=True)
    rep.add_argument("--tests-rc", type=int, required=True)
    rep.add_argument("--build-rc", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == "verify":
        return verify(args.bundle)
    if args.command == "field":
        print(json.loads(args.path.read_text())[args.name])
        return 0
    if args.command == "link-parent":
        return link_parent(args.venv)
    return report(args)


if __name__ == "__main__":
    sys.exit(main())
