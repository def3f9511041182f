"""Options and fixtures of the on-device suite.

    python -m pytest device_tests --bundle PATH [--runtime onnxruntime|openvino|tensorrt]... [--threads N]
                                  [--results out.json] [--min-queries N] [--min-duration S] ...

Each artifact x runtime is measured once, in a fresh process (device_tests.measure), and the measurement is
shared by the tests that check it. --results writes every measurement and every test outcome as JSON,
also when tests fail: nothing measured is lost."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from device_tests.bundle import Bundle
from device_tests.environment import environment
from device_tests.errors import DeviceTestError
from device_tests.latency import LatencySettings
from device_tests.measure import EXIT_SKIPPED, write_json
from device_tests.runners import get_runner

SCHEMA = "edgesmith.device-results/1"
DEFAULT_RUNTIMES = ("onnxruntime", "openvino")
PACKAGE_PARENT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser):
    g = parser.getgroup("edgesmith", "on-device validation")
    g.addoption("--bundle", type=Path, help="bundle folder: artifacts.json, the artifacts, eval.npz")
    g.addoption("--runtime", action="append", dest="runtimes", help=f"repeatable; default {' '.join(DEFAULT_RUNTIMES)}")
    g.addoption("--threads", type=int, default=1, help="runtime threads (0: the runtime's default)")
    g.addoption("--precision-hint", default="f32", help="OpenVINO inference precision (f32, bf16, f16)")
    g.addoption("--results", type=Path, help="write every measurement and test outcome to this JSON file")
    g.addoption("--min-queries", type=int, default=1024)
    g.addoption("--min-duration", type=float, default=2.0, help="seconds")
    g.addoption("--warmup", type=int, default=50)
    g.addoption("--throughput-batch", type=int, default=64)
    g.addoption("--emulated", action="store_true",
                help="the CPU is emulated: skip what only measures time beyond the protocol (per-layer profile, the "
                     "runtime's own benchmark tool); the results say so")
    g.addoption("--min-fp32-agreement", type=float, default=0.99,
                help="an FP32 artifact must reproduce the exported FP32 predictions on this fraction of eval images")


class Session:
    """What the suite knows: the bundle, the settings, the measurements taken, the test outcomes."""

    def __init__(self, config):
        opt = config.option
        self.bundle_path = opt.bundle
        self.runtimes = list(dict.fromkeys(opt.runtimes or DEFAULT_RUNTIMES))
        self.threads = opt.threads
        self.precision_hint = opt.precision_hint
        self.settings = LatencySettings(opt.min_queries, opt.min_duration, opt.warmup, opt.throughput_batch)
        self.results_path = opt.results
        self.min_fp32_agreement = opt.min_fp32_agreement
        self.emulated = opt.emulated
        self.measurements: dict[tuple[str, str], dict] = {}
        self.npu: dict[str, dict] = {}  # ethos_u artifact -> Vela's estimates (device_tests/vela.py)
        self.outcomes: list[dict] = []
        self.error: str | None = None
        self.bundle: Bundle | None = None

    def load(self) -> None:
        for name in self.runtimes:
            get_runner(name)  # unknown names fail before anything runs
        if self.bundle_path is None:
            raise DeviceTestError("No bundle given.", "Run: python -m pytest device_tests --bundle PATH.")
        self.bundle = Bundle.load(self.bundle_path, verify=False)  # integrity is a test, per artifact

    def cases(self) -> list[tuple[str, str]]:
        return [(a.file, rt) for rt in self.runtimes for a in self.bundle.for_formats(get_runner(rt).bundle_formats)]

    def npu_cases(self) -> list[str]:
        """ethos_u artifacts: compiled for an NPU, not run here; their Vela estimates are recorded."""
        return [a.file for a in self.bundle.for_formats(("ethos_u",))]

    def npu_estimates(self, file: str) -> dict:
        if file not in self.npu:
            from device_tests.vela import device_record

            artifact = next(a for a in self.bundle.artifacts if a.file == file)
            self.npu[file] = device_record(self.bundle.root, artifact.extra, file, artifact.sha256)
        return self.npu[file]

    def measure(self, artifact: str, runtime: str) -> dict:
        if (artifact, runtime) not in self.measurements:
            self.measurements[(artifact, runtime)] = self._run_child(artifact, runtime)
        return self.measurements[(artifact, runtime)]

    def _run_child(self, artifact: str, runtime: str) -> dict:
        s = self.settings
        with tempfile.TemporaryDirectory(prefix="edgesmith-measure-") as tmp:
            out = Path(tmp) / "result.json"
            args = [sys.executable, "-m", "device_tests.measure", "--bundle", str(Path(self.bundle_path).resolve()),
                    "--artifact", artifact, "--runtime", runtime, "--threads", str(self.threads),
                    "--precision-hint", self.precision_hint, "--min-queries", str(s.min_queries),
                    "--min-duration", str(s.min_duration_s), "--warmup", str(s.warmup),
                    "--throughput-batch", str(s.throughput_batch), "--out", str(out)]
            if self.emulated:
                args += ["--layer-runs", "0", "--no-tool"]
            try:
                proc = subprocess.run(args, cwd=PACKAGE_PARENT, capture_output=True, text=True,
                                      timeout=600 + 20 * s.min_duration_s)
            except subprocess.TimeoutExpired:
                return {"artifact": artifact, "runtime": runtime, "status": "error", "skipped": False,
                        "message": "the measurement process did not finish in time"}
            if out.is_file():
                result = json.loads(out.read_text())
            else:  # the runtime crashed the process before it could write anything
                result = {"artifact": artifact, "runtime": runtime, "status": "error",
                          "message": f"measurement process exited with code {proc.returncode}: "
                                     f"{proc.stderr.strip()[-2000:]}"}
        result["exit_code"] = proc.returncode
        result["skipped"] = proc.returncode == EXIT_SKIPPED
        return result

    # -- pytest hooks (the session is registered as a plugin) --------------------------------------------
    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" or report.outcome != "passed":
            self.outcomes.append({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                                  "message": _message(report)})

    def pytest_sessionfinish(self, session, exitstatus) -> None:
        if self.error is None:
            self.write()

    def write(self) -> None:
        if self.results_path is None:
            return
        counts = {k: sum(o["outcome"] == k for o in self.outcomes) for k in ("passed", "failed", "skipped")}
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        data = {"schema": SCHEMA, "bundle": str(self.bundle_path), "created": created,
                "environment": environment(), "error": self.error,
                "settings": {"runtimes": self.runtimes, "threads": self.threads, "precision_hint": self.precision_hint,
                             "emulated": self.emulated, **self.settings.to_dict()},
                "runs": list(self.measurements.values()), "npu": list(self.npu.values()),
                "tests": {**counts, "outcomes": self.outcomes}}
        self.results_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.results_path, data)


SESSION = pytest.StashKey[Session]()


def pytest_configure(config):
    session = Session(config)
    config.stash[SESSION] = session
    config.pluginmanager.register(session, "edgesmith-device-session")
    if config.option.help:
        return
    if config.option.bundle is None:
        raise pytest.UsageError("device_tests needs --bundle PATH (the folder with artifacts.json, the models, eval.npz).")
    try:
        session.load()
    except DeviceTestError as exc:
        session.error = str(exc)
        session.write()  # the caller still gets a results file that says what went wrong
        raise pytest.UsageError(str(exc)) from None


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        session = metafunc.config.stash[SESSION]
        cases = session.cases()
        metafunc.parametrize("case", cases, ids=[f"{a}-{rt}" for a, rt in cases])
    if "npu_case" in metafunc.fixturenames:
        metafunc.parametrize("npu_case", metafunc.config.stash[SESSION].npu_cases())


def _message(report) -> str:
    if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    if report.outcome == "failed":
        crash = getattr(report.longrepr, "reprcrash", None)
        return crash.message if crash is not None else str(report.longrepr)[-1000:]
    return ""


@pytest.fixture(scope="session")
def device(request) -> Session:
    return request.config.stash[SESSION]


@pytest.fixture(scope="session")
def bundle(device) -> Bundle:
    return device.bundle
