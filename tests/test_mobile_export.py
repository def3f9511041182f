"""LiteRT, TFLite Micro and ExecuTorch artifacts from a tiny CNN, with the real converters and runtimes:
parity with PyTorch, INT8 I/O, metadata in the .tflite, the firmware C sources (compiled with `cc -c` where a
compiler exists, bytes equal to the .tflite), the arena, and the errors a user can cause."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from exporters.config import ExportConfig
from exporters.errors import ExportError
from exporters.formats import EXPORT_FORMATS, ExportJob
from tests.test_export import net, quantized

pytest.importorskip("litert_torch", reason="the `mobile` extra is not installed")
pytest.importorskip("executorch")
pytest.importorskip("tflite_micro")

SHAPE = (1, 1, 8, 8)


def job_for(tmp_path, formats, model=None, with_int8=True) -> ExportJob:
    gen = torch.Generator().manual_seed(1)
    model = model if model is not None else net()
    parity_inputs = torch.randn(40, *SHAPE[1:], generator=gen)
    labels = model(parity_inputs).argmax(1).detach().numpy()
    return ExportJob(
        out=tmp_path, cfg=ExportConfig(formats=formats, dynamic_batch=False), log=lambda m: None,
        meta={"class_names": ["a", "b", "c"], "preprocessing": {"size": 8, "channels": 1}},
        example=torch.zeros(SHAPE), models={"fp32": model, "int8": quantized(model) if with_int8 else None},
        parity_inputs=parity_inputs.numpy(), parity_labels=labels,
        calibration=list(torch.randn(32, *SHAPE[1:], generator=gen).unsqueeze(1)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("mobile")
    job = job_for(out, ["litert", "tflm", "executorch"])
    artifacts = {a["file"]: a for name in ("litert", "tflm", "executorch") for a in EXPORT_FORMATS.get(name)(job)}
    return out, artifacts


def test_every_mobile_artifact_matches_pytorch(exported):
    _, artifacts = exported
    assert set(artifacts) == {"model.tflite", "model.int8.tflite", "tflm/model.int8.tflite", "model.pte",
                              "model.int8.pte"}
    for name in ("model.tflite", "model.pte"):
        assert artifacts[name]["parity"]["max_abs_logit_diff"] < 1e-4, name
        assert artifacts[name]["parity"]["top1_agreement"] == 1.0
    for name in ("model.int8.tflite", "tflm/model.int8.tflite", "model.int8.pte"):
        checked = artifacts[name]["parity"]
        assert checked["top1_agreement"] >= 0.8, (name, checked)
        assert "accuracy_minus_nncf_int8" in checked
        assert artifacts[name]["quantization"]["calibration_images"] == 32


def test_int8_tflite_is_full_integer_with_its_scales_recorded(exported):
    out, artifacts = exported
    io = artifacts["model.int8.tflite"]["io"]
    assert io["input"]["dtype"] == "int8" and io["output"]["dtype"] == "int8"
    assert io["input"]["scale"] > 0 and io["output"]["scale"] > 0
    assert artifacts["model.tflite"]["io"]["input"]["dtype"] == "float32"


def test_tflite_metadata_describes_the_input_the_file_takes(exported):
    from exporters.tflite_file import read_tflite_metadata

    out, artifacts = exported
    for name in ("model.tflite", "model.int8.tflite", "tflm/model.int8.tflite"):
        io = artifacts[name]["io"]["input"]
        for meta in (read_tflite_metadata(out / name), json.loads((out / artifacts[name]["sidecar"]).read_text())):
            assert meta["input"]["dtype"] == io["dtype"] and meta["input"]["shape"] == io["shape"], (name, meta["input"])
    assert artifacts["tflm/model.int8.tflite"]["io"]["input"]["dtype"] == "int8"


def test_tflite_carries_edgesmith_metadata(exported):
    from exporters.tflite_file import read_tflite_metadata

    out, _ = exported
    meta = read_tflite_metadata(out / "model.int8.tflite")
    assert meta["class_names"] == ["a", "b", "c"] and meta["precision"] == "int8" and meta["format"] == "litert"


def test_litert_and_tflm_runners_agree_on_the_int8_model(exported):
    from device_tests.runners import get_runner

    out, artifacts = exported
    x = np.random.default_rng(0).standard_normal((5, *SHAPE[1:])).astype(np.float32)
    path = out / "tflm" / "model.int8.tflite"
    step = artifacts["tflm/model.int8.tflite"]["io"]["output"]["scale"]
    with get_runner("litert")(path, "tflm") as lite, get_runner("tflm")(path, "tflm") as micro:
        # XNNPACK's int8 kernels and TFLM's reference kernels may round differently: at most one output step
        assert np.abs(lite.infer(x) - micro.infer(x)).max() <= step * 1.01
        assert micro.describe()["arena_used_bytes"] > 0


def test_tflm_c_array_equals_the_tflite_and_compiles(exported, tmp_path):
    from exporters.tflm import array_bytes

    out, artifacts = exported
    entry = artifacts["tflm/model.int8.tflite"]
    source, header = out / entry["c_source"], out / entry["c_header"]
    assert array_bytes(source) == (out / "tflm" / "model.int8.tflite").read_bytes()
    text = header.read_text()
    assert f"#define EDGESMITH_TENSOR_ARENA_SIZE {entry['arena_bytes']}u" in text
    assert "(resolver).AddConv2D();" in text and f"#define EDGESMITH_OP_COUNT {len(entry['ops'])}" in text
    assert entry["arena_min_bytes"] <= entry["arena_bytes"] and entry["arena_min_bytes"] > 0
    compiler = shutil.which("c++") or shutil.which("cc")
    if compiler is None:
        pytest.skip("no C/C++ compiler on this machine")
    subprocess.run([shutil.which("cc") or compiler, "-c", str(source), "-o", str(tmp_path / "model_data.o")],
                   check=True, capture_output=True)
    # Link a program that writes the array out: the compiled bytes, not just the text, equal the .tflite.
    main = tmp_path / "main.cc"
    main.write_text('#include <cstdio>\n#include "model_data.h"\nint main(){'
                    'return std::fwrite(g_model_data, 1, g_model_data_len, stdout) == g_model_data_len ? 0 : 1;}\n')
    exe = tmp_path / "dump"
    subprocess.run([compiler, f"-I{source.parent}", str(main), str(source), "-o", str(exe)], check=True,
                   capture_output=True)
    assert subprocess.run([str(exe)], capture_output=True, check=True).stdout == \
        (out / "tflm" / "model.int8.tflite").read_bytes()
    assert (int(subprocess.run(["nm", str(tmp_path / "model_data.o")], capture_output=True, text=True)
                .stdout.split()[0], 16) % 16 == 0) if shutil.which("nm") else True


def test_tflm_arena_constant_is_enough_and_the_minimum_is_tight(exported):
    from tflite_micro.python.tflite_micro import runtime

    from exporters.tflm import _fits, _silenced_stderr

    out, artifacts = exported
    entry = artifacts["tflm/model.int8.tflite"]
    data = (out / "tflm" / "model.int8.tflite").read_bytes()
    image = np.zeros(SHAPE, np.int8)
    with _silenced_stderr():
        assert _fits(data, entry["arena_min_bytes"], image)
        assert not _fits(data, entry["arena_min_bytes"] - 64, image)
    del runtime


class Odd(nn.Module):
    def forward(self, x):
        return torch.special.bessel_j0(x).mean((2, 3))  # no LiteRT or XNNPACK lowering


@pytest.mark.parametrize("fmt", ["litert", "executorch"])
def test_unsupported_op_is_named_with_the_format(tmp_path, fmt):
    job = job_for(tmp_path, [fmt], model=Odd().eval(), with_int8=False)
    with pytest.raises(ExportError) as err:
        EXPORT_FORMATS.get(fmt)(job)
    assert "bessel_j0" in err.value.problem and fmt in err.value.problem, err.value.problem
    assert "export.formats" in err.value.fix


def test_missing_extra_is_a_config_error_naming_the_extra(monkeypatch):
    from exporters.mobile import check_mobile_extra
    from pipeline.errors import ConfigError

    monkeypatch.setitem(sys.modules, "litert_torch", None)  # as if litert-torch were not installed
    with pytest.raises(ConfigError) as err:
        check_mobile_extra(["onnx", "litert", "executorch"])
    assert "litert" in err.value.problem and "`mobile` extra" in err.value.problem
    assert "executorch" not in err.value.problem.split("asks for")[1].split(",")[0]
    assert ".[mobile]" in err.value.fix
    check_mobile_extra(["onnx", "executorch"])  # installed: no error


def test_edgesmith_check_refuses_a_mobile_format_without_the_extra(monkeypatch, tmp_path):
    from pipeline.config import parse_config
    from pipeline.errors import ConfigError
    from pipeline.preflight import check_names
    from tests.conftest import tiny_config_dict

    cfg = parse_config(tiny_config_dict(tmp_path, **{"export.formats": ["onnx", "litert"]}))
    monkeypatch.setitem(sys.modules, "litert_torch", None)  # as if litert-torch were not installed
    with pytest.raises(ConfigError, match="`mobile` extra"):
        check_names(cfg)  # what `edgesmith check` and `edgesmith build` run before anything else
