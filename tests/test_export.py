"""Exporter building blocks on tiny models: ONNX FP32/INT8, unsupported ops, weight folding, TensorRT kit."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from exporters.config import MOBILE_FORMATS, ExportConfig, TensorRTConfig, in_order
from exporters.errors import ExportError
from exporters.eval_set import write_npz
from exporters.onnx_export import export_onnx, export_onnx_int8
from exporters.parity import onnxruntime_runner, openvino_runner
from exporters.tensorrt import availability, build_options, trtexec_command, write_build_kit
from quantize.fold import fold_batchnorm
from quantize.nncf_ops import calibration_batches, quantize_ptq


class Net(nn.Module):
    def __init__(self, odd_op: bool = False):
        super().__init__()
        self.odd_op = odd_op
        self.conv1 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        # same shape as conv2: the exporter shares their equal zero-point tensors through Identity nodes
        self.conv3 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.conv3(self.conv2(self.conv1(x)))
        if self.odd_op:
            x = torch.cumprod(x, dim=1)  # no ONNX export rule at any opset
        return self.head(x.mean((2, 3)))


def net(odd_op=False) -> nn.Module:
    torch.manual_seed(0)
    return Net(odd_op).eval()


EXAMPLE = torch.zeros(1, 1, 8, 8)


def quantized(model):
    gen = torch.Generator().manual_seed(0)
    return quantize_ptq(fold_batchnorm(model)[0], calibration_batches([torch.randn(32, 1, 8, 8, generator=gen)]))


def test_fp32_onnx_matches_torch_in_onnxruntime_and_openvino(tmp_path):
    from exporters.openvino_ir import convert_to_ir

    model, x = net(), torch.randn(6, 1, 8, 8)
    export_onnx(model, tmp_path / "m.onnx", EXAMPLE, opset=17, dynamic_batch=True)
    convert_to_ir(tmp_path / "m.onnx", tmp_path / "m.xml", {})
    expected = model(x).detach().numpy()
    assert np.abs(onnxruntime_runner(tmp_path / "m.onnx")(x.numpy()) - expected).max() < 1e-4
    assert np.abs(openvino_runner(tmp_path / "m.xml")(x.numpy()) - expected).max() < 1e-4


def test_static_batch_export_has_a_fixed_batch_dimension(tmp_path):
    export_onnx(net(), tmp_path / "m.onnx", EXAMPLE, opset=17, dynamic_batch=False)
    dims = onnx.load(str(tmp_path / "m.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 1, 8, 8]


def test_unsupported_op_names_the_op_and_the_fix(tmp_path):
    with pytest.raises(ExportError) as err:
        export_onnx(net(odd_op=True), tmp_path / "m.onnx", EXAMPLE, opset=17, dynamic_batch=True)
    assert "aten::cumprod" in err.value.problem and "opset 17" in err.value.problem
    assert "export.formats" in err.value.fix and "qat.ignored_scope" in err.value.fix
    assert not (tmp_path / "m.onnx").exists(), "no half-written file"


def test_int8_export_of_a_model_with_an_unsupported_op_names_it(tmp_path):
    with pytest.raises(ExportError) as err:
        export_onnx_int8(quantized(net(odd_op=True)), tmp_path / "m.int8.onnx", EXAMPLE, 17, True)
    assert "aten::cumprod" in err.value.problem


def test_int8_weights_are_folded_without_changing_the_outputs(tmp_path):
    from exporters.onnx_export import fold_weight_quantizers

    q = quantized(net())
    folded_count = export_onnx_int8(q, tmp_path / "folded.onnx", EXAMPLE, 17, True)
    assert folded_count == 4  # three convolutions and the linear layer
    proto = onnx.load(str(tmp_path / "folded.onnx"))
    weights = {n.input[1] for n in proto.graph.node if n.op_type in ("Conv", "Gemm")}
    producers = {n.output[0]: n for n in proto.graph.node}
    assert all(producers[w].op_type == "DequantizeLinear" for w in weights)
    stored = {t.name: t.data_type for t in proto.graph.initializer}
    assert all(stored[producers[w].input[0]] == onnx.TensorProto.INT8 for w in weights)
    assert not any(n.op_type == "Identity" for n in proto.graph.node)
    assert fold_weight_quantizers(proto) == 0, "folding is idempotent"
    x = torch.randn(16, 1, 8, 8)
    ort_out = onnxruntime_runner(tmp_path / "folded.onnx")(x.numpy())
    # ONNX Runtime's integer kernels vs NNCF's float fake-quant: rounding-level differences only
    assert np.abs(ort_out - q(x).detach().numpy()).max() < 0.02


def test_onnx_export_is_byte_stable(tmp_path):
    q = quantized(net())
    for name in ("a", "b"):
        export_onnx_int8(q, tmp_path / f"{name}.onnx", EXAMPLE, 17, True)
        export_onnx(net(), tmp_path / f"{name}.fp32.onnx", EXAMPLE, 17, True)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert (tmp_path / "a.fp32.onnx").read_bytes() == (tmp_path / "b.fp32.onnx").read_bytes()


def test_npz_is_byte_stable_and_loads_with_numpy(tmp_path):
    arrays = {"labels": np.arange(5), "images_u8": np.ones((5, 1, 2, 2), np.uint8)}
    write_npz(tmp_path / "a.npz", arrays)
    write_npz(tmp_path / "b.npz", dict(reversed(arrays.items())))
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with np.load(tmp_path / "a.npz") as npz:
        assert np.array_equal(npz["labels"], arrays["labels"]) and npz["images_u8"].dtype == np.uint8


# --- TensorRT: the build kit is always written and checked; the build itself needs TensorRT and a GPU ---

def kit(tmp_path, **trt):
    options = build_options(TensorRTConfig(**trt), "model.int8.onnx", "input", (1, 28, 28))
    (tmp_path / "model.int8.onnx").write_bytes(b"")
    write_build_kit(tmp_path / "tensorrt", options)
    return options


def dry_run(folder) -> dict:
    out = subprocess.run([sys.executable, str(folder / "build_engine.py"), "--dry-run"], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


def test_build_kit_options_reach_the_builder(tmp_path):
    kit(tmp_path, precision="int8", workspace_mb=512, max_batch=32, opt_batch=8)
    plan = dry_run(tmp_path / "tensorrt")
    assert plan["onnx"] == str((tmp_path / "model.int8.onnx").resolve())
    assert plan["engine"] == str((tmp_path / "tensorrt/model.int8.engine").resolve())
    assert plan["workspace_bytes"] == 512 << 20
    assert plan["profile"] == {"input": {"min": [1, 1, 28, 28], "opt": [8, 1, 28, 28], "max": [32, 1, 28, 28]}}
    assert plan["strongly_typed"] and not plan["int8"]  # INT8 comes from the Q/DQ nodes
    assert plan["timing_cache"] == str((tmp_path / "tensorrt/timing.cache").resolve())


def test_fp16_without_timing_cache(tmp_path):
    kit(tmp_path, precision="fp16", timing_cache=False)
    plan = dry_run(tmp_path / "tensorrt")
    assert plan["fp16"] and not plan["strongly_typed"] and plan["timing_cache"] is None


def test_older_tensorrt_gets_int8_and_fp16_flags():
    from exporters.trt_builder import plan

    options = build_options(TensorRTConfig(precision="int8"), "m.onnx", "input", (1, 8, 8))
    steps = plan(options, trt_major=8)
    assert steps["int8"] and steps["fp16"] and not steps["strongly_typed"]


def test_trtexec_command_and_shell_script(tmp_path):
    options = kit(tmp_path, precision="int8", workspace_mb=256, timing_cache=True)
    cmd = trtexec_command(options)
    assert cmd[:3] == ["trtexec", "--onnx=../model.int8.onnx", "--saveEngine=model.int8.engine"]
    assert "--memPoolSize=workspace:256" in cmd and "--timingCacheFile=timing.cache" in cmd
    assert "--maxShapes=input:64x1x28x28" in cmd
    script = tmp_path / "tensorrt/build_engine.sh"
    assert script.stat().st_mode & 0o111
    if shutil.which("bash"):
        subprocess.run(["bash", "-n", str(script)], check=True)  # syntax check


def test_build_script_without_trtexec_or_tensorrt_says_what_to_install(tmp_path):
    kit(tmp_path)
    if availability()[0] or shutil.which("trtexec"):
        pytest.skip("TensorRT is installed here; the missing-TensorRT message cannot be observed")
    out = subprocess.run(["bash", str(tmp_path / "tensorrt/build_engine.sh")], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 2 and "TensorRT" in out.stderr and "install" in out.stderr.lower()


def test_engine_build_on_this_machine(tmp_path):
    can_build, reason = availability()
    if not can_build:
        pytest.skip(f"TensorRT engine build skipped: {reason}")
    from exporters.tensorrt import build_here

    export_onnx_int8(quantized(net()), tmp_path / "model.int8.onnx", EXAMPLE, 17, True)
    write_build_kit(tmp_path / "tensorrt", build_options(TensorRTConfig(max_batch=4), "model.int8.onnx", "input",
                                                         (1, 8, 8)))
    assert build_here(tmp_path / "tensorrt").stat().st_size > 0


def test_export_config_defaults_and_validation():
    from pydantic import ValidationError

    cfg = ExportConfig()
    assert cfg.formats == ["onnx", "onnx_int8", "openvino"] and cfg.opset == 17
    with pytest.raises(ValidationError):
        ExportConfig(formats=["onnx", "onnx"])
    with pytest.raises(ValidationError):
        ExportConfig(tensorrt={"precision": "int4"})
    with pytest.raises(ValidationError, match="Did you mean 'openvino'"):
        ExportConfig(formats=["openvno"])


def test_every_format_in_the_table_is_registered_and_nothing_else():
    from exporters.config import FORMAT_NAMES
    from exporters.formats import EXPORT_FORMATS
    from exporters.mobile import NEEDS

    assert sorted(FORMAT_NAMES) == EXPORT_FORMATS.names()
    assert sorted(MOBILE_FORMATS) == sorted(NEEDS)


def test_formats_run_in_the_tables_order():
    assert in_order(["executorch", "onnx_int8", "litert", "onnx"]) == ["onnx", "onnx_int8", "litert", "executorch"]


def test_mixed_preset_gives_asymmetric_activations_that_onnxruntime_still_fuses(tmp_path):
    from onnx import numpy_helper

    from exporters.formats import fused_ops

    gen = torch.Generator().manual_seed(0)
    q = quantize_ptq(fold_batchnorm(net())[0], calibration_batches([torch.randn(32, 1, 8, 8, generator=gen)]),
                     preset="mixed")
    export_onnx_int8(q, tmp_path / "m.onnx", EXAMPLE, 17, True)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    zero_points = [inits[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[2] in inits]
    assert any(np.any(z != 0) for z in zero_points), "mixed: some activation has a non-zero zero point"
    assert fused_ops(tmp_path / "m.onnx").get("QLinearConv", 0) == 3
    x = torch.randn(8, 1, 8, 8)
    assert np.abs(onnxruntime_runner(tmp_path / "m.onnx")(x.numpy()) - q(x).detach().numpy()).max() < 0.02


def test_int8_convolutions_onnxruntime_cannot_fuse_are_reported(tmp_path):
    from exporters.formats import ExportJob, onnx_int8

    class HardSwishNet(nn.Module):  # MobileNetV3-style activation: ONNX Runtime keeps DQ -> Conv in float
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3, padding=1)
            self.act = nn.Hardswish()
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.act(self.conv(x)).mean((2, 3)))

    torch.manual_seed(0)
    model = HardSwishNet().eval()
    q = quantize_ptq(model, calibration_batches([torch.randn(16, 1, 8, 8)]))
    logs: list[str] = []
    inputs = torch.randn(20, 1, 8, 8).numpy()
    job = ExportJob(out=tmp_path, cfg=ExportConfig(), meta={"class_names": ["a", "b", "c"]}, example=EXAMPLE,
                    models={"fp32": model, "int8": q}, parity_inputs=inputs, parity_labels=np.zeros(20, np.int64),
                    log=logs.append)
    [record] = onnx_int8(job)
    assert record["onnxruntime_int8_conv_fraction"] < 1
    assert any("warning" in line and "model.int8.onnx" in line for line in logs)
    assert record["parity"]["top1_agreement"] >= 0.95
