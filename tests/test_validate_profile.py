"""`edgesmith profile MODEL`: the validate measurement for any model file, with no config."""

import json
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.errors import ConfigError
from pipeline.validation.cli import run_profile
from pipeline.validation.config import LatencyConfig, SshConfig
from tests.helpers import SSHD, TINY_LATENCY, SshServer, shared_bundle

TINY = ["--queries", "64", "--duration", "0.05", "--warmup", "5", "--batch", "8"]


@pytest.fixture(scope="module")
def cli():
    from pipeline.cli import app

    return app


def test_profile_onnx_with_an_eval_set(cli, tmp_path):
    out = tmp_path / "p.json"
    result = CliRunner().invoke(cli, ["profile", str(shared_bundle() / "model.onnx"), "--eval",
                                      str(shared_bundle() / "eval.npz"), "--json", str(out), *TINY])
    assert result.exit_code == 0, result.output
    assert "p50 ms" in result.output and "accuracy: top-1" in result.output
    data = json.loads(out.read_text())
    ev = np.load(shared_bundle() / "eval.npz")
    # the preprocessing spec was found in artifacts.json next to the model: FP32 predictions reproduced
    assert data["accuracy"]["agreement_fp32"] == 1.0
    assert data["accuracy"]["top1"] == pytest.approx(np.mean(ev["fp32_pred"] == ev["labels"]))
    assert data["runtime"] == "onnxruntime" and data["latency"]["queries"] >= 64


def test_profile_openvino_ir_without_eval_uses_synthetic_input(cli):
    result = CliRunner().invoke(cli, ["profile", str(shared_bundle() / "openvino" / "model.int8.xml"), "--threads", "2",
                                      *TINY])
    assert result.exit_code == 0, result.output
    assert "openvino" in result.output and "2 thread(s)" in result.output and "random input" in result.output


@pytest.mark.parametrize("kwargs,match", [
    ({"model": "missing.onnx"}, "does not exist"),
    ({"runtime": "onnxrutime"}, "Did you mean 'onnxruntime'"),
    ({"model": "openvino/model.xml", "runtime": "onnxruntime"}, "onnxruntime runtime cannot run model.xml"),
    ({"model": "eval.npz"}, "suffix '.npz'"),
    ({"target": "ssh://nouser"}, "--target"),
])
def test_profile_bad_input_is_a_clear_error(kwargs, match):
    args = {"model": "model.onnx", "runtime": None, "target": "local", **kwargs}
    with pytest.raises(ConfigError, match=match):
        run_profile(shared_bundle() / args["model"], args["runtime"], args["target"], None, 1,
                    LatencyConfig(**TINY_LATENCY))


@pytest.mark.slow
@pytest.mark.skipif(not SSHD.exists(), reason="needs Debian openssh-server (scripts/ensure_test_deps.sh)")
def test_profile_on_an_ssh_target(tmp_path):
    with SshServer(tmp_path / "sshd") as server:
        ssh = SshConfig(python=sys.executable, known_hosts=str(server.known_hosts), key_file=str(server.user_key),
                        workdir=str(tmp_path / "remote"))
        data = run_profile(shared_bundle() / "openvino" / "model.xml", None, server.target,
                           shared_bundle() / "eval.npz", 1, LatencyConfig(**TINY_LATENCY), ssh=ssh)
    assert data["target"] == server.target and data["runtime"] == "openvino"
    assert data["environment"]["executable"].startswith(str(tmp_path / "remote"))
    assert data["accuracy"]["agreement_fp32"] == 1.0
