"""Per-layer quantization error, keep_fp32 and NNCF accuracy control on a tiny trained model (real NNCF, real
ONNX Runtime, no mocks): the error table names the model's layers, keep_fp32 leaves exactly those layers in
float (and the INT8 ONNX still fuses the others), an unknown layer name lists the valid ones, and accuracy
control never returns a model whose measured validation drop exceeds max_drop (or fails with that drop)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.errors import ConfigError
from quantize.config import QATConfig
from quantize.errors import QuantizationError
from quantize.fold import fold_batchnorm
from quantize.layer_error import onnx_layer_error, quantized_layers, torch_layer_error
from quantize.nncf_ops import calibration_batches, quantize_ptq
from quantize.precision import _accuracy, compute_layers, quantize_student


class Net(nn.Module):
    """Conv-BN-ReLU x3, pool, Linear on 1x12x12."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
            nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU()),
            nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        return self.head(self.pool(self.features(x)).flatten(1))


def _data(n: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Three classes: a bright blob in one of three places, plus noise (learnable in a few steps)."""
    gen = np.random.default_rng(seed)
    labels = gen.integers(0, 3, n)
    x = gen.normal(0, 0.6, (n, 1, 12, 12)).astype(np.float32)
    for i, c in enumerate(labels):
        x[i, 0, 2 + 3 * c:5 + 3 * c, 3:9] += 2.0
    return torch.from_numpy(x), labels


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = Net()
    x, y = _data(600, 0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        for i in range(0, len(x), 50):
            loss = nn.functional.cross_entropy(model(x[i:i + 50]), torch.as_tensor(y[i:i + 50]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    folded = fold_batchnorm(model.eval())[0]
    val_x, val_y = _data(300, 1)
    calibration = calibration_batches([_data(64, 2)[0]])
    assert _accuracy(folded, val_x, val_y) > 0.9  # the task is learned: drops are meaningful
    return folded, calibration, val_x, val_y


def test_torch_layer_error_names_every_compute_layer(trained):
    folded, calibration, _, _ = trained
    quantized = quantize_ptq(folded, calibration)
    rows = torch_layer_error(folded, quantized, torch.cat(calibration))
    assert {r["layer"] for r in rows} == set(compute_layers(folded)) == {"features.0.0", "features.1.0", "features.2.0", "head"}
    assert all(r["quantized"] for r in rows)
    assert [r["sqnr_db"] for r in rows] == sorted(r["sqnr_db"] for r in rows)  # worst first
    for r in rows:
        assert 5 < r["sqnr_db"] < 80 and 0.9 < r["cosine"] <= 1.0 and "added_db" in r


def test_keep_fp32_names_leave_exactly_those_layers_in_float(trained, tmp_path):
    from exporters.formats import fused_ops
    from exporters.onnx_export import export_onnx, export_onnx_int8

    folded, calibration, val_x, val_y = trained
    cfg = QATConfig(mode="ptq", keep_fp32=["features.1.0"])
    model, info = quantize_student(folded, calibration, val_x, val_y, cfg, log=lambda m: None)
    assert info["kept_fp32"] == ["features.1.0"]
    assert quantized_layers(model) == {"features.0.0", "features.2.0", "head"}   # weights: only features.1.0 float
    rows = {r["layer"]: r for r in torch_layer_error(folded, model, torch.cat(calibration))}
    assert not rows["features.1.0"]["quantized"] and rows["features.0.0"]["quantized"]
    # The exported INT8 ONNX still fuses what can be fused: features.1.0 runs in float, and so does its producer
    # features.0.0 (its output is no longer quantized); features.2.0 keeps its Q/DQ pairs and becomes QLinearConv.
    fp32, int8 = tmp_path / "m.onnx", tmp_path / "m.int8.onnx"
    export_onnx(folded, fp32, calibration[0], 17, True)
    export_onnx_int8(model, int8, calibration[0], 17, True)
    ops = fused_ops(int8)
    assert ops.get("QLinearConv", 0) == 1 and ops.get("Conv", 0) + ops.get("FusedConv", 0) == 2, ops
    onnx_rows = {r["layer"]: r for r in onnx_layer_error(fp32, int8, val_x[:64].numpy())}
    assert set(onnx_rows) == {"features.0.0", "features.1.0", "features.2.0", "head"}
    assert not onnx_rows["features.1.0"]["quantized"] and onnx_rows["features.2.0"]["quantized"]


def test_keep_fp32_auto_keeps_the_worst_layers(trained):
    folded, calibration, val_x, val_y = trained
    cfg = QATConfig(mode="ptq", keep_fp32=["auto"], keep_fp32_count=2)
    model, info = quantize_student(folded, calibration, val_x, val_y, cfg, log=lambda m: None)
    ranking = sorted(info["keep_fp32_auto_ranking"], key=lambda r: -r["added_db"])
    assert info["kept_fp32"] == [r["layer"] for r in ranking[:2]]
    assert quantized_layers(model) == set(compute_layers(folded)) - set(info["kept_fp32"])


def test_unknown_keep_fp32_layer_lists_the_valid_names(trained):
    folded, calibration, val_x, val_y = trained
    with pytest.raises(ConfigError) as err:
        quantize_student(folded, calibration, val_x, val_y, QATConfig(keep_fp32=["features.9"]), log=lambda m: None)
    text = str(err.value)
    assert "features.9" in text and all(n in text for n in ("features.0.0", "features.1.0", "features.2.0", "head"))


def test_keep_fp32_auto_cannot_be_mixed_with_names():
    with pytest.raises(ValueError, match="auto"):
        QATConfig(keep_fp32=["auto", "head"])


@pytest.mark.parametrize("max_drop", [0.0, 0.02])
def test_accuracy_control_meets_max_drop_or_fails_with_the_drop(trained, max_drop):
    folded, calibration, val_x, val_y = trained
    # Calibrating on 4 images makes plain PTQ lose accuracy, so accuracy control has work to do.
    few = calibration[:4]
    cfg = QATConfig(mode="ptq_accuracy_control", max_drop=max_drop, calibration_size=4)
    fp32 = _accuracy(folded, val_x, val_y)
    try:
        model, info = quantize_student(folded, few, val_x, val_y, cfg, log=lambda m: None)
    except QuantizationError as exc:
        measured = fp32 - _accuracy(quantize_ptq(folded, few), val_x, val_y)
        assert "measured validation accuracy drop" in str(exc) and measured > max_drop
        return
    drop = fp32 - _accuracy(model, val_x, val_y)
    assert drop <= max_drop + 1e-12
    assert info["accuracy_control"]["measured_drop"] == pytest.approx(drop)
    assert quantized_layers(model) == set(compute_layers(folded)) - set(info["kept_fp32"])


def test_build_with_an_unknown_keep_fp32_layer_fails_with_the_valid_names(write_config):
    """Through the CLI, as a user meets it: a clear error, non-zero exit, no traceback, no qat output."""
    from pipeline.models import create_model
    from quantize.precision import compute_layers
    from tests.conftest import run_cli

    cfg = write_config(**{"qat.mode": "ptq", "qat.calibration_size": 16, "qat.keep_fp32": ["features.9"]})
    proc = run_cli("build", cfg)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out
    assert "features.9" in out
    valid = compute_layers(fold_batchnorm(create_model("cnn_tiny", 4, 1))[0])
    assert valid and all(name in out for name in valid)
    assert not list((cfg.parent / "builds").glob("*/qat-*"))


class _Stem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_stem = nn.Conv2d(1, 4, 3, padding=1)
        self.blocks = nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()))

    def forward(self, x):
        return self.blocks(self.conv_stem(x)).mean((2, 3))


class _Wrapped(nn.Module):
    """A timm model inside a wrapper, as the benchmark's teacher: module names model.conv_stem, model.blocks.0.0."""

    def __init__(self):
        super().__init__()
        self.model = _Stem()

    def forward(self, x):
        return self.model(x)


def test_onnx_nodes_map_to_the_torch_modules_they_came_from(tmp_path):
    """Accuracy control reports reverted layers by their ONNX node names; the torch exporter writes a wrapped
    model's attribute as '/model/conv_stem/Conv' but a Sequential child as '/model/blocks/model.blocks.0/...':
    both must come back as the modules NNCF's torch graph knows (it failed on 'conv_stem' for EfficientNet)."""
    import onnx

    from exporters.onnx_export import export_onnx
    from quantize.layer_error import compute_nodes, layer_name

    model = _Wrapped().eval()
    export_onnx(model, tmp_path / "m.onnx", torch.zeros(1, 1, 8, 8), 17, dynamic_batch=True)
    modules = {name for name, _ in model.named_modules()}
    names = [layer_name(n.name, modules) for n in compute_nodes(onnx.load(str(tmp_path / "m.onnx")).graph)]
    assert names == ["model.conv_stem", "model.blocks.0.0"]
