"""The CUDA code paths: mixed precision, channels_last, determinism. The tests marked `gpu` need a GPU and skip
elsewhere (scripts/gpu_check.sh runs them with `pytest -m gpu tests/test_cuda.py`); the others check on the CPU
what decides those paths."""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import View
from pipeline.distill.config import DistillConfig
from pipeline.distill.methods import METHODS
from pipeline.distill.train import Models, TeacherOutputs, layer_pairs, mixed_precision
from pipeline.models import create_model
from pipeline.models.layout import channels_last_model
from pipeline.runner import seed_everything
from tests.conftest import REPO, run_cli


def needs_cuda(test):
    """Marked `gpu` (what `pytest -m gpu` selects) and skipped without a CUDA device."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


def test_mixed_precision_only_where_amp_is_on_and_the_device_is_a_gpu():
    assert isinstance(mixed_precision(torch.device("cpu"), True), nullcontext)
    assert isinstance(mixed_precision(torch.device("cuda"), False), nullcontext)   # distill.amp: false
    with pytest.warns(UserWarning) if not torch.cuda.is_available() else nullcontext():
        assert isinstance(mixed_precision(torch.device("cuda", 0), True), torch.autocast)


def test_builds_ask_cublas_for_a_deterministic_workspace_unless_the_user_chose_one(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seed_everything(0, 0)
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    import os

    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    seed_everything(0, 0)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_more_processes_than_gpus_on_a_node_is_refused_with_a_fix():
    from pipeline.distributed import gpu_of
    from pipeline.errors import DistributedError

    assert gpu_of(0, 1) == 0 and gpu_of(3, 4) == 3
    with pytest.raises(DistributedError) as caught:
        gpu_of(1, 1)        # `--nproc 2` on a one-GPU machine: rank 1 used to fail in set_device (invalid ordinal)
    assert "local rank 1" in str(caught.value) and "1 GPU(s)" in str(caught.value)
    assert "--nproc" in caught.value.fix


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cuda_build(out: Path, until: str = "qat", *sets: str) -> Path:
    result = run_cli("build", REPO / "configs" / "tiny.yaml", "--until", until, "--set", "build.device=cuda",
                     "--set", f"build.output={out}", *[a for s in sets for a in ("--set", s)])
    assert result.returncode == 0, result.stdout + result.stderr
    return out / "tiny"


@pytest.fixture(scope="module")
def tiny_cuda_build(tmp_path_factory) -> Path:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return cuda_build(tmp_path_factory.mktemp("cuda") / "builds")


def meta(build: Path, stage: str) -> dict:
    return json.loads(next(build.glob(f"{stage}-*/stage.json")).read_text())


@needs_cuda
def test_a_cuda_build_trains_with_amp_and_saves_cpu_contiguous_weights(tiny_cuda_build):
    from pipeline.models import load_student
    from quantize.model_io import load_quantized_student

    distill = meta(tiny_cuda_build, "distill")
    assert distill["device"] == "cuda" and distill["metrics"]["amp"] is True
    assert all(np.isfinite(h["total"]) for h in distill["metrics"]["history"])
    state = torch.load(next(tiny_cuda_build.glob("distill-*/student.pt")), map_location="cpu", weights_only=True)
    assert all(t.is_contiguous() for t in state.values())
    student, _ = load_student(next(tiny_cuda_build.glob("distill-*")))
    assert all(p.device.type == "cpu" for p in student.parameters())
    qat = meta(tiny_cuda_build, "qat")
    assert 0.0 <= qat["metrics"]["int8_test_acc"] <= 1.0
    model, _ = load_quantized_student(next(tiny_cuda_build.glob("qat-*")))
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 4)


@needs_cuda
def test_two_cuda_builds_give_the_same_bytes(tiny_cuda_build, tmp_path):
    """docs/reproducibility.md: on one GPU (same torch, CUDA, cuDNN) a rebuild gives byte-identical weights."""
    again = cuda_build(tmp_path / "builds", "distill")
    for stage, name in (("teacher", "teacher.pt"), ("distill", "student.pt")):
        assert sha256(next(again.glob(f"{stage}-*/{name}"))) == sha256(next(tiny_cuda_build.glob(f"{stage}-*/{name}")))


@needs_cuda
@pytest.mark.parametrize("amp,dtype", [(True, torch.float16), (False, torch.float32)])
def test_the_teacher_runs_in_half_precision_only_with_amp(amp, dtype):
    torch.manual_seed(0)
    teacher, student = create_model("cnn_tiny", 10, 1).eval(), create_model("cnn_tiny", 4, 1)
    models = Models(teacher, student, View(28, 1, (0.5,), (0.5,)), View(28, 1, (0.5,), (0.5,)), [0, 2, 4, 6])
    cfg = DistillConfig(method="fitnet", epochs=1)
    pairs = layer_pairs("auto", models)          # found with CPU probes, before the models move
    method = METHODS.get("fitnet")(cfg, pairs=pairs, teacher=teacher, student=student, models=models).cuda()
    teacher.cuda()
    seen = []
    conv = next(m for m in teacher.modules() if isinstance(m, torch.nn.Conv2d))
    handle = conv.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    raw = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    logits, targets = TeacherOutputs(models, method, raw, torch.device("cuda"), cached=False, amp=amp).compute(raw)
    handle.remove()
    assert seen == [dtype]
    assert logits.dtype == torch.float32 and all(t.dtype == torch.float32 for t in targets.values())


@needs_cuda
def test_channels_last_on_cuda_gives_the_default_layout_back_and_the_same_outputs():
    torch.manual_seed(0)
    model = create_model("cnn_tiny", 4, 1).cuda().eval()
    x = torch.randn(4, 1, 28, 28, device="cuda")
    with torch.no_grad():
        plain = model(x)
        with channels_last_model(model):
            fast = model(x.contiguous(memory_format=torch.channels_last))
    assert all(p.is_contiguous() for p in model.parameters())
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)
