"""Run the device_tests suite on one target: here (a subprocess) or over SSH. A target that fails is a recorded
run, never an exception, so that one unreachable board does not lose the other targets' results."""

from __future__ import annotations

from pathlib import Path

from ..errors import EdgesmithError
from .config import ValidateConfig
from .ssh import run_ssh
from .suite import TargetRun, load_results, run_local
from .targets import Target


def run_target(target: Target, bundle: Path, cfg: ValidateConfig, results: Path) -> TargetRun:
    if target.kind == "local":
        return run_local(bundle, cfg, results)
    try:
        return run_ssh(target, bundle, cfg, results)
    except EdgesmithError as exc:  # unreachable, host key, missing runtime: recorded, the build fails later
        return TargetRun(target.spec, load_results(results), exc.message)
    except Exception as exc:  # noqa: BLE001 (one target's unexpected failure must not lose the others' results)
        return TargetRun(target.spec, load_results(results), f"unexpected error on this target: {exc!r}")
