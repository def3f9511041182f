"""An arm64 target without a board: scripts/arm64_target.sh builds an arm64 Debian root filesystem that runs
here under qemu (binfmt_misc) with an sshd; the ordinary validate.targets mechanism validates a bundle on it.
The emulated target's times are marked and not budgeted; its accuracies are compared image by image with x86.

The end-to-end test runs the device suite under emulation (a few minutes), so it is opt-in:
    scripts/arm64_target.sh build          # once, as root (about 10 minutes)
    EDGESMITH_ARM64=1 .venv/bin/python -m pytest tests/test_arm64_target.py -m arm64
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.validation.budgets import EMULATED, check
from pipeline.validation.config import Budgets, ValidateConfig
from pipeline.validation.crosstarget import FP32_LOGIT_TOLERANCE, compare
from pipeline.validation.sections import validation_sections
from pipeline.validation.suite import TargetRun, run_local
from pipeline.validation.targets import parse_target
from tests.helpers import TINY_LATENCY, free_port, shared_bundle

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "arm64_target.sh"
ARM64_HOME = Path(os.environ.get("EDGESMITH_ARM64_HOME", Path.home() / ".cache" / "edgesmith" / "arm64-bookworm"))
EMU = "ssh://root@127.0.0.1:2222?emulated=true"


def test_a_target_declares_that_it_is_emulated():
    assert parse_target(EMU).emulated and parse_target(EMU).python is None
    both = parse_target("ssh://pi@10.0.0.5?python=/opt/venv/bin/python&emulated=false")
    assert not both.emulated and both.python == "/opt/venv/bin/python" and not parse_target("local").emulated
    with pytest.raises(ValueError, match="emulated= takes true or false, got 'maybe'"):
        parse_target("ssh://pi@10.0.0.5?emulated=maybe")
    with pytest.raises(ValueError, match=r"options are \?python=... and \?emulated=true"):
        parse_target("ssh://pi@10.0.0.5?emulate=true")
    assert ValidateConfig(targets=["local", EMU]).targets == ["local", EMU]


@pytest.fixture(scope="module")
def local_results(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("local") / "results.json"
    run = run_local(shared_bundle(), ValidateConfig(latency=TINY_LATENCY), path)
    assert run.ok, run.error or run.log[-2000:]
    return run.results


def test_emulated_latency_is_marked_and_not_budgeted_accuracy_still_is(local_results):
    # The same real results under two names: only the target's declaration differs.
    runs = [TargetRun("local", local_results), TargetRun(EMU, local_results)]
    verdicts = check(runs, Budgets(max_p99_ms=1e-6, min_accuracy=0.0, max_size_mb=1e-6))
    p99 = {v.target: v for v in verdicts if v.budget == "max_p99_ms"}
    assert not p99["local"].ok and p99[EMU].ok and p99[EMU].allowed == EMULATED and "(emulated)" in p99[EMU].measured
    sizes = [v for v in verdicts if v.budget == "max_size_mb" and v.target == EMU]
    assert sizes and not any(v.ok for v in sizes)  # size (and accuracy) budgets still apply to the emulated target
    assert {v.target for v in verdicts if v.budget == "min_accuracy"} == {"local", EMU}
    md = "\n".join(s.markdown for s in validation_sections(runs, verdicts, []))
    assert f"{EMU} (emulated)" in md and "their times are not a measure of any device" in md


def test_logits_are_recorded_and_compared_image_by_image(local_results):
    n_eval = local_results["runs"][0]["accuracy"]["n"]
    assert all(r["accuracy"]["logits"]["shape"][0] == n_eval for r in local_results["runs"])
    rows = compare([TargetRun("local", local_results), TargetRun(EMU, local_results)])
    assert len(rows) == len(local_results["runs"])
    assert all(r.agreement == 1.0 and r.max_dlogit == 0.0 and r.reference == "local" for r in rows)


# -- the script: bad input ---------------------------------------------------------------------------------
needs_root_tools = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("debootstrap") or not shutil.which("qemu-aarch64-static"),
    reason="needs root and Debian's debootstrap + qemu-user-static (scripts/arm64_target.sh installs them)")


def _script(*args, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


@needs_root_tools
@pytest.mark.parametrize("register", [False, True], ids=["no-binfmt_misc", "registration-ignored"])
def test_script_without_binfmt_misc_says_so_and_exits_2(tmp_path, register):
    binfmt = tmp_path / "binfmt_misc"  # not the kernel's: an empty folder, or one whose 'register' does nothing
    binfmt.mkdir()
    if register:
        (binfmt / "register").write_text("")
    home = tmp_path / "home"
    proc = _script("build", EDGESMITH_BINFMT_DIR=str(binfmt), EDGESMITH_ARM64_HOME=str(home))
    assert proc.returncode == 2, proc.stderr
    assert f"binfmt_misc cannot run arm64 programs here: {binfmt} has no enabled qemu-aarch64 entry" in proc.stderr
    assert "docker run --privileged" in proc.stderr and "Traceback" not in proc.stderr
    assert not (home / "rootfs").exists()  # nothing was built


@needs_root_tools
def test_script_start_before_build_and_usage_exit_2(tmp_path):
    proc = _script("start", EDGESMITH_ARM64_HOME=str(tmp_path / "home"))
    assert proc.returncode == 2 and "run" in proc.stderr and "build' first" in proc.stderr
    proc = _script("launch")
    assert proc.returncode == 2 and "usage:" in proc.stderr


# -- end to end on the emulated arm64 target -----------------------------------------------------------------
def _binfmt_ready() -> bool:
    entry = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
    return entry.is_file() and entry.read_text().startswith("enabled")


@pytest.fixture(scope="module")
def arm64_target(tmp_path_factory):
    if os.environ.get("EDGESMITH_ARM64") != "1":
        pytest.skip("the emulated arm64 target takes minutes: set EDGESMITH_ARM64=1 (after scripts/arm64_target.sh build)")
    if os.geteuid() != 0 or not (ARM64_HOME / "built").is_file():
        pytest.skip(f"no arm64 root filesystem in {ARM64_HOME}: run scripts/arm64_target.sh build as root first")
    if not _binfmt_ready():
        pytest.skip("binfmt_misc has no qemu-aarch64 entry: scripts/arm64_target.sh start registers it (as root)")
    was_running = "running:" in _script("status").stdout
    proc = _script("start", EDGESMITH_ARM64_PORT=str(free_port()))
    assert proc.returncode == 0, proc.stderr
    yield proc.stdout.strip().splitlines()[-1]
    if not was_running:
        _script("stop")


@pytest.mark.arm64
def test_bundle_validated_on_arm64_agrees_with_x86(arm64_target, tmp_path):
    from pipeline.config import parse_config
    from pipeline.progress import ProgressDisplay
    from pipeline.stage import StageContext, StageRecord
    from pipeline.stages.validate import ValidateStage
    from tests.conftest import tiny_config_dict

    raw = tiny_config_dict(tmp_path / "builds")
    raw["validate"] = {"targets": ["local", arm64_target], "runtimes": ["onnxruntime", "openvino"],
                       "latency": TINY_LATENCY, "budgets": {"max_p99_ms": 1e-6, "min_accuracy": 0.0},
                       "ssh": {"key_file": str(ARM64_HOME / "id_ed25519"), "known_hosts": str(ARM64_HOME / "known_hosts"),
                               "connect_timeout_s": 60, "command_timeout_s": 1500}}
    out = tmp_path / "validate"
    out.mkdir()
    ctx = StageContext(parse_config(raw), out, {"export": StageRecord("export", "k" * 64, shared_bundle(), {})},
                       ProgressDisplay(enabled=False), "v" * 64)
    metrics = ValidateStage().run(ctx)
    errors = {t["target"]: t["error"] for t in metrics["targets"]}
    assert errors == {"local": None, arm64_target: None}, errors
    remote = json.loads((out / f"results-{parse_target(arm64_target).slug}.json").read_text())
    assert remote["environment"]["machine"] == "aarch64" and remote["settings"]["emulated"] is True
    # on an emulated CPU the timing extras (per-layer profile, the runtime's own tool) are not run
    assert not any("tool" in r or r.get("layers", {}).get("layers") for r in remote["runs"])
    # every artifact, on every runtime that loads it, measured with its accuracy on eval.npz
    local = json.loads((out / "results-local.json").read_text())
    pairs = {(r["artifact"], r["runtime"]) for r in local["runs"]}
    assert {(r["artifact"], r["runtime"]) for r in remote["runs"]} == pairs
    assert all(r["status"] == "passed" and r["accuracy"]["n"] == local["runs"][0]["accuracy"]["n"] for r in remote["runs"])
    rows = compare([TargetRun("local", local), TargetRun(arm64_target, remote)])
    assert {(r.artifact, r.runtime) for r in rows} == pairs and metrics["cross_target"] == [r.to_dict() for r in rows]
    for r in rows:
        if r.precision == "int8":
            assert r.agreement >= 0.99, r
        else:
            assert r.max_dlogit <= FP32_LOGIT_TOLERANCE, r
    # latency: budgeted on x86 (missed: 1e-6 ms), not applied on the emulated target
    p99 = [v for v in metrics["budgets"] if v["budget"] == "max_p99_ms"]
    assert {v["ok"] for v in p99 if v["target"] == "local"} == {False}
    assert {v["allowed"] for v in p99 if v["target"] == arm64_target} == {EMULATED}
    assert f"{arm64_target} (emulated)" in (out / "report.md").read_text()
