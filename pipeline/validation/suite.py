"""Run the on-device suite on one target and bring its results.json home. Locally it is a subprocess of this
Python; over SSH see ssh.py. A target that cannot run the suite yields a TargetRun with the error, so the
other targets' results (and this error) still reach the report."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..cache import PROJECT_ROOT
from .config import ValidateConfig

DEVICE_TESTS = PROJECT_ROOT / "device_tests"
DEVICE_FILES = ("*.py", "*.ini", "runners/*.py")  # what a target needs of device_tests/
EXIT_MEANING = {0: "all tests passed", 1: "some tests failed", 2: "interrupted", 3: "internal error",
                4: "usage error (bad bundle or option)", 5: "no tests collected"}


@dataclass
class TargetRun:
    target: str
    results: Optional[dict] = None
    error: Optional[str] = None
    exit_code: Optional[int] = None
    log: str = ""
    setup: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and self.results is not None

    def summary(self) -> dict:
        return {"target": self.target, "exit_code": self.exit_code, "error": self.error, "setup": self.setup,
                "meaning": EXIT_MEANING.get(self.exit_code, "")}


def suite_args(python: str, device_tests: str, bundle: str, results: str, cfg: ValidateConfig) -> list[str]:
    lat = cfg.latency
    args = [python, "-m", "pytest", device_tests, "--bundle", bundle, "--results", results, "-q", "-rfEs",
            "--threads", str(cfg.threads), "--precision-hint", cfg.precision_hint,
            "--min-queries", str(lat.min_queries), "--min-duration", str(lat.min_duration_s),
            "--warmup", str(lat.warmup), "--throughput-batch", str(lat.throughput_batch),
            "--min-fp32-agreement", str(cfg.min_fp32_agreement)]
    for runtime in cfg.runtimes:
        args += ["--runtime", runtime]
    return args


def device_files() -> list[Path]:
    return sorted({p for pattern in DEVICE_FILES for p in DEVICE_TESTS.glob(pattern)})


def bundle_files(bundle: Path) -> list[Path]:
    """artifacts.json, eval.npz and every artifact it lists (with the .bin of an OpenVINO IR), relative."""
    from exporters.artifacts import ARTIFACTS_FILE, ArtifactListing

    files = {Path(ARTIFACTS_FILE), Path("eval.npz")} | {Path(f) for f in ArtifactListing.read(bundle).model_files()}
    return sorted(f for f in files if (bundle / f).is_file())


def load_results(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_local(bundle: Path, cfg: ValidateConfig, results: Path) -> TargetRun:
    # Absolute paths: the suite runs in the project folder, the build (and a relative build.output) anywhere.
    args = suite_args(sys.executable, str(DEVICE_TESTS), str(Path(bundle).resolve()), str(Path(results).resolve()), cfg)
    timeout = cfg.ssh.command_timeout_s
    try:
        proc = subprocess.run(args, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return TargetRun("local", load_results(results), f"the device suite did not finish within {timeout:.0f} s")
    return _finish("local", proc.returncode, proc.stdout + proc.stderr, load_results(results))


def _finish(target: str, code: int, log: str, results: Optional[dict]) -> TargetRun:
    run = TargetRun(target, results, None, code, log[-20000:])
    if results is None:
        run.error = f"the device suite wrote no results (exit {code}: {EXIT_MEANING.get(code, '?')}): {_tail(log)}"
    elif results.get("error"):
        run.error = results["error"]
    return run


def _tail(log: str, lines: int = 6) -> str:
    return " | ".join(line for line in log.strip().splitlines()[-lines:] if line.strip())
