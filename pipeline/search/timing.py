"""Where and how candidates are timed: search.latency.target, `local` (a process on this machine) or one of
validate.targets over SSH (one connection per measuring round: the round's INT8 files copied, the device suite's
device_tests.timing run in the target's venv, p50/p99 read back). Either way the same torch-free entry runs the
suite's single-stream protocol, with validate.threads threads, pinned like the suite pins.

The figures of the first round are kept in the study folder, one file per target and protocol: a changed budget
reuses them, and a figure timed on one machine is never read as another's."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional

import numpy as np

from ..errors import DeviceError
from ..validation.targets import Target

RUNTIME = "onnxruntime"
MODULE = "device_tests.timing"


@dataclass(frozen=True)
class Timed:
    """One model to time: its file and the preprocessing of its input (size, channels, mean, std)."""

    path: Path
    preprocess: dict


class Timer:
    """Times a round of models on one target; `protocol` identifies what the figures mean (the target, threads and
    the single-stream settings), `records` keeps the first round's figures under that identity."""

    def __init__(self, target: Target, threads: int, settings, images: np.ndarray, validate=None):
        self.target, self.threads, self.settings, self.images = target, threads, settings, images
        self.validate = validate        # ValidateConfig: the SSH options of a remote target
        self.last: dict = {}            # the last round's result (environment of the machine that timed it)

    @property
    def environment(self) -> dict:
        """The machine that timed the last round (device_tests.environment), as its process reported it."""
        return self.last.get("environment", {})

    @property
    def protocol(self) -> dict:
        s = self.settings
        return {"target": self.target.spec, "threads": self.threads, "min_queries": s.min_queries,
                "min_duration_s": s.min_duration_s, "warmup": s.warmup, "runtime": RUNTIME}

    def records(self, folder: Path) -> "Records":
        digest = hashlib.sha256(json.dumps(self.protocol, sort_keys=True).encode()).hexdigest()[:8]
        return Records(Path(folder) / f"timed-{self.target.slug}-{digest}.json", self.protocol)

    def __call__(self, models: list[Timed]) -> list[float]:
        """p99 (ms) of each model's call, in order: one process (one connection) for the round."""
        if not models:
            return []
        with tempfile.TemporaryDirectory(prefix="edgesmith-timing-") as tmp:
            folder = Path(tmp)
            manifest = self._manifest(folder, models)
            result = folder / "timing-result.json"
            code, log = self._run_local(manifest, result) if self.target.kind == "local" else \
                self._run_ssh(folder, models, result)
            data = _result(result)
        if code != 0 or data.get("status") != "passed":
            message = data.get("message") or log.strip()[-600:]
            raise DeviceError(f"Timing the search candidates on {self.target.spec} failed (exit {code}): {message}",
                              "Check that onnxruntime runs there (edgesmith profile --target ... runs one model the "
                              "same way); the trials are kept, so the build resumes from them.")
        self.last = data
        return [float(m["p99_ms"]) for m in data["models"]]

    def _manifest(self, folder: Path, models: list[Timed]) -> Path:
        np.save(folder / "images.npy", np.ascontiguousarray(self.images))
        names = [m.path.name if self.target.kind != "local" else str(m.path.resolve()) for m in models]
        spec = {"runtime": RUNTIME, "threads": self.threads, "cpus": "auto", "images": "images.npy",
                "settings": {"min_queries": self.settings.min_queries,
                             "min_duration_s": self.settings.min_duration_s, "warmup": self.settings.warmup},
                "models": [{"file": n, "preprocess": m.preprocess} for n, m in zip(names, models)]}
        path = folder / "manifest.json"
        path.write_text(json.dumps(spec, indent=1))
        return path

    def _run_local(self, manifest: Path, result: Path) -> tuple[int, str]:
        from ..cache import PROJECT_ROOT

        # A process of its own: pinned like the suite's measurement, without the build's threads and memory.
        proc = subprocess.run([sys.executable, "-m", MODULE, "--manifest", str(manifest), "--out", str(result)],
                              cwd=PROJECT_ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
        return proc.returncode, proc.stdout + proc.stderr

    def _run_ssh(self, folder: Path, models: list[Timed], result: Path) -> tuple[int, str]:
        from ..validation.ssh import run_module_ssh

        files = [(m.path, PurePosixPath("search", m.path.name)) for m in models]
        files += [(folder / name, PurePosixPath("search", name)) for name in ("images.npy", "manifest.json")]
        try:
            return run_module_ssh(self.target, self.validate, files, MODULE, ["--manifest", "@/search/manifest.json"],
                                  RUNTIME, result, "the timing of the search candidates")
        except DeviceError as exc:
            raise DeviceError(f"The search times its candidates on {self.target.spec} (search.latency.target), "
                              f"but: {exc.problem}", f"{exc.fix} The trials are kept: once the target answers, the "
                              "build resumes from them (or set search.latency.target: local).") from None


def _result(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


class Records:
    """First-round p99 figures by artifact file name, for one target and protocol (a JSON file)."""

    def __init__(self, path: Path, protocol: dict):
        self.path, self.protocol = path, protocol
        raw = _result(path)
        self.p99: dict[str, float] = raw.get("p99_ms", {}) if raw.get("protocol") == protocol else {}

    def get(self, artifact: str) -> Optional[float]:
        return self.p99.get(artifact)

    def add(self, figures: dict[str, float], environment: dict) -> None:
        from device_tests.measure import write_json

        self.p99.update(figures)
        write_json(self.path, {"protocol": self.protocol, "environment": environment, "p99_ms": self.p99})

