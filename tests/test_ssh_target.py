"""SSH targets against a real OpenSSH server started by the test on 127.0.0.1 (throw-away host and user
keys, its own sshd_config, a free port): the bundle is copied, the suite runs in a venv on the target, the
results come back; unknown hosts, refused keys, dead ports, a missing Python or runtime are clear errors."""

import json
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.errors import DeviceError
from pipeline.validation.config import ValidateConfig
from pipeline.validation.run import run_target
from pipeline.validation.ssh import SshSession
from pipeline.validation.targets import parse_target
from tests.helpers import SSHD, TINY_LATENCY, SshServer, free_port, keygen, shared_bundle

pytestmark = pytest.mark.skipif(not SSHD.exists() or shutil.which("ssh-keygen") is None,
                                reason="needs Debian openssh-server (scripts/ensure_test_deps.sh installs it)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with SshServer(tmp_path_factory.mktemp("sshd")) as srv:
        yield srv


def cfg_for(server, tmp_path, **ssh) -> ValidateConfig:
    # The target's Python is this venv's: the test machine is the target, and the suite needs numpy + runtimes.
    options = {"python": sys.executable, "known_hosts": str(server.known_hosts), "key_file": str(server.user_key),
               "workdir": str(tmp_path / "remote"), "connect_timeout_s": 10, **ssh}
    return ValidateConfig(targets=[server.target], latency=TINY_LATENCY, ssh=options)


@pytest.mark.slow
def test_suite_runs_over_ssh_in_a_venv_and_results_come_back(server, tmp_path):
    results = tmp_path / "results.json"
    run = run_target(parse_target(server.target), shared_bundle(), cfg_for(server, tmp_path), results)
    assert run.ok and run.exit_code == 0, run.error or run.log[-2000:]
    data = json.loads(results.read_text())
    assert data["tests"]["failed"] == 0 and {r["status"] for r in data["runs"]} == {"passed"}
    # it ran in the venv made on the target, from the copied bundle and the copied device_tests
    venv_python = Path(run.setup["venv_python"])
    assert venv_python.parent.parent.parent == tmp_path / "remote" and (venv_python.parent.parent / "pyvenv.cfg").is_file()
    run_dir = Path(run.setup["run_dir"])
    assert data["bundle"] == str(run_dir / "bundle")
    assert (run_dir / "bundle" / "openvino" / "model.bin").is_file() and (run_dir / "device_tests" / "conftest.py").is_file()
    assert data["environment"]["executable"].startswith(str(venv_python.parent.parent))


def test_unknown_host_key_is_refused(server, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(DeviceError, match="not in .*known_hosts; edgesmith does not trust unknown hosts.*ssh-keyscan"):
        with SshSession(parse_target(server.target), cfg_for(server, tmp_path, known_hosts=str(empty)).ssh):
            pass


def test_changed_host_key_is_refused(server, tmp_path):
    other = keygen(tmp_path / "other_host")
    kind, key = other.with_suffix(".pub").read_text().split()[:2]
    forged = tmp_path / "known_hosts"
    forged.write_text(f"[127.0.0.1]:{server.port} {kind} {key}\n")
    with pytest.raises(DeviceError, match="does not match.*ssh-keygen -R"):
        with SshSession(parse_target(server.target), cfg_for(server, tmp_path, known_hosts=str(forged)).ssh):
            pass


def test_key_not_authorized_is_refused(server, tmp_path):
    stranger = keygen(tmp_path / "stranger")
    with pytest.raises(DeviceError, match="refused the key.*authorized_keys"):
        with SshSession(parse_target(server.target), cfg_for(server, tmp_path, key_file=str(stranger)).ssh):
            pass


def test_unreachable_target_is_a_clear_error(server, tmp_path):
    target = parse_target(f"ssh://{server.user}@127.0.0.1:{free_port()}")
    with pytest.raises(DeviceError, match="Cannot reach 127.0.0.1.*sshd runs there"):
        with SshSession(target, cfg_for(server, tmp_path).ssh):
            pass


def test_missing_python_on_the_target(server, tmp_path):
    run = run_target(parse_target(server.target), shared_bundle(),
                     cfg_for(server, tmp_path, python=str(tmp_path / "no" / "python3")), tmp_path / "r.json")
    assert not run.ok and "has no Python at" in run.error and "validate.ssh.python" in run.error


def test_missing_runtime_on_the_target(server, tmp_path):
    cfg = cfg_for(server, tmp_path).model_copy(update={"runtimes": ["tensorrt"]})
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    run = run_target(parse_target(server.target), shared_bundle(), cfg, tmp_path / "r.json")
    assert not run.ok and "lacks tensorrt" in run.error and "pip install tensorrt" in run.error


def test_remote_commands_are_argument_lists(server, tmp_path):
    # A file name with shell syntax reaches the target as one argument, not as a command.
    with SshSession(parse_target(server.target), cfg_for(server, tmp_path).ssh) as session:
        code, out = session.run(["printf", "%s|", "a b", "$(touch pwned)", "x;y"], timeout=10)
    assert code == 0 and out == "a b|$(touch pwned)|x;y|"
    assert not (Path.home() / "pwned").exists()


def test_a_failure_after_connecting_is_a_failed_row_not_a_crash(server, tmp_path):
    # /proc refuses new folders even to root: the upload fails once the session is up (sftp raises OSError).
    cfg = cfg_for(server, tmp_path, workdir="/proc/edgesmith-cannot-write-here")
    run = run_target(parse_target(server.target), shared_bundle(), cfg, tmp_path / "r.json")
    assert not run.ok and "failed after connecting, while copying the bundle" in run.error, run.error
    assert "validate.ssh.workdir" in run.error


@pytest.mark.slow
def test_one_target_failing_after_connecting_keeps_the_other_targets_results(server, tmp_path):
    from pipeline.config import parse_config
    from pipeline.progress import ProgressDisplay
    from pipeline.stage import StageContext, StageRecord
    from pipeline.stages.validate import ValidateStage
    from tests.conftest import tiny_config_dict

    raw = tiny_config_dict(tmp_path / "builds")
    raw["validate"] = {"targets": [server.target, "local"], "latency": TINY_LATENCY,
                       "ssh": {**cfg_for(server, tmp_path).ssh.model_dump(), "workdir": "/proc/edgesmith-x"}}
    out = tmp_path / "validate"
    out.mkdir()
    ctx = StageContext(parse_config(raw), out, {"export": StageRecord("export", "k" * 64, shared_bundle(), {})},
                       ProgressDisplay(enabled=False), "v" * 64)
    metrics = ValidateStage().run(ctx)
    assert metrics["complete"] is False and not metrics["passed"]
    errors = {t["target"]: t["error"] for t in metrics["targets"]}
    assert "failed after connecting" in errors[server.target] and errors["local"] is None
    assert (out / "results-local.json").is_file() and {a["target"] for a in metrics["artifacts"]} == {"local"}


def _kill_sessions_once_the_suite_runs(server, marker: str, timeout: float = 120.0) -> threading.Thread:
    """The target dies mid-validation: once the suite's process (its command line holds `marker`) is up, every
    sshd session process of the server is killed, as when a board loses power or network."""
    import psutil

    def kill():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(marker in " ".join(p.info["cmdline"] or []) and "--results" in (p.info["cmdline"] or [])
                   for p in psutil.process_iter(["cmdline"])):
                for child in psutil.Process(server.process.pid).children(recursive=True):
                    child.kill()
                return
            time.sleep(0.05)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_a_target_dying_mid_suite_names_the_step_and_keeps_the_other_targets_results(tmp_path):
    from pipeline.config import parse_config
    from pipeline.progress import ProgressDisplay
    from pipeline.stage import StageContext, StageRecord
    from pipeline.stages.validate import ValidateStage
    from tests.conftest import tiny_config_dict

    with SshServer(tmp_path / "sshd") as server:  # its own server: this test kills its sessions
        raw = tiny_config_dict(tmp_path / "builds")
        raw["validate"] = {"targets": [server.target, "local"], "latency": TINY_LATENCY,
                           "ssh": cfg_for(server, tmp_path).ssh.model_dump()}
        out = tmp_path / "validate"
        out.mkdir()
        ctx = StageContext(parse_config(raw), out, {"export": StageRecord("export", "k" * 64, shared_bundle(), {})},
                           ProgressDisplay(enabled=False), "v" * 64)
        killer = _kill_sessions_once_the_suite_runs(server, str(tmp_path / "remote"))
        metrics = ValidateStage().run(ctx)
        killer.join()
    errors = {t["target"]: t["error"] for t in metrics["targets"]}
    assert "failed after connecting, while running the device suite: the connection was lost" in errors[server.target]
    assert errors["local"] is None and not metrics["passed"] and metrics["complete"] is False
    failed = [v for v in metrics["budgets"] if v["target"] == server.target]
    assert [v["budget"] for v in failed] == ["target ran the suite"] and "running the device suite" in failed[0]["measured"]
    assert (out / "results-local.json").is_file() and {a["target"] for a in metrics["artifacts"]} == {"local"}


@pytest.mark.slow
def test_runtimes_are_checked_by_import_name_and_a_target_runs_with_those_it_has(server, tmp_path):
    # litert is imported as ai_edge_litert.interpreter; a board without a wheel for one runtime (tensorrt here)
    # still validates with the others, and the setup says which it lacked.
    pytest.importorskip("ai_edge_litert.interpreter")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    cfg = cfg_for(server, tmp_path).model_copy(update={"runtimes": ["onnxruntime", "litert", "tensorrt"]})
    run = run_target(parse_target(server.target), shared_bundle(), cfg, tmp_path / "r.json")
    assert run.ok, run.error
    assert run.setup["missing_runtimes"] == ["tensorrt"] and "ai_edge_litert.interpreter" in run.setup["versions"]
    assert {r["runtime"] for r in run.results["runs"] if r["status"] == "passed"} == {"onnxruntime"}
