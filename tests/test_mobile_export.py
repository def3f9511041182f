"""LiteRT, TFLite Micro and ExecuTorch artifacts from a tiny CNN, with the real converters and runtimes:
parity with PyTorch, INT8 I/O, metadata in the .tflite, the firmware C sources (compiled with `cc -c` where a
compiler exists, bytes equal to the .tflite), the arena, and the errors a user can cause."""

from __future__ import annotations

import importlib.util
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
HAVE_VELA = importlib.util.find_spec("ethosu") is not None
needs_vela = pytest.mark.skipif(not HAVE_VELA, reason="the `npu` extra (ethos-u-vela) is not installed")

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


MOBILE = ["litert", "tflm", *(["ethos_u"] if HAVE_VELA else []), "executorch"]
NPUS = ["ethos-u55-128", "ethos-u85-256"] if HAVE_VELA else []


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("mobile")
    job = job_for(out, MOBILE)
    job.cfg = ExportConfig(formats=MOBILE, dynamic_batch=False, ethos_u={"targets": NPUS})
    artifacts = {a["file"]: a for name in MOBILE for a in EXPORT_FORMATS.get(name)(job)}
    return out, artifacts


def test_every_mobile_artifact_matches_pytorch(exported):
    _, artifacts = exported
    assert set(artifacts) == {"model.tflite", "model.int8.tflite", "tflm/model.int8.tflite", "model.pte",
                              "model.int8.pte", *(f"ethos_u/{npu}/model_vela.tflite" for npu in NPUS)}
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


# -- Arm Ethos-U (Vela) ---------------------------------------------------------------------------------------

@needs_vela
def test_vela_leaves_the_channel_mean_on_the_cpu_and_names_it(exported):
    """The tiny net's global average pool is a MEAN over H and W of a 4x4x16 map, which Vela does not place on the
    U55 or U85 (a reduction over depth): counted and named, not an error; the convolutions go to the NPU."""
    out, artifacts = exported
    for npu in NPUS:
        entry = artifacts[f"ethos_u/{npu}/model_vela.tflite"]
        est = entry["npu"]
        assert est["accelerator"] == npu and est["cpu_ops"] == 1 and est["npu_ops"] >= 4, est
        assert [c["operator"] for c in est["cpu_fallback"]] == ["Mean"] and est["cpu_fallback"][0]["reason"]
        assert est["cycles"] > 0 and est["inference_ms"] == pytest.approx(est["cycles"] / (est["clock_mhz"] * 1e3))
        assert est["sram_kib"] > 0 and est["flash_kib"] > 0
        assert entry["ops"] == ["ETHOS_U", "MEAN"] and entry["parity"] is None
        assert {r["target"] for r in est["layers"]} == {"NPU", "CPU"}
        for key in ("vela_summary", "vela_layers", "vela_ini", "vela_input"):
            assert (out / entry[key]).is_file(), key
    u55 = artifacts["ethos_u/ethos-u55-128/model_vela.tflite"]["npu"]
    assert (u55["system_config"], u55["memory_mode"], u55["clock_mhz"]) == ("Ethos_U55_High_End_Embedded", "Shared_Sram", 500)


@needs_vela
def test_ethos_u_c_array_equals_the_vela_tflite(exported):
    from exporters.tflm import array_bytes

    out, artifacts = exported
    entry = artifacts["ethos_u/ethos-u55-128/model_vela.tflite"]
    assert array_bytes(out / entry["c_source"]) == (out / entry["file"]).read_bytes()
    header = (out / entry["c_header"]).read_text()
    assert '#define EDGESMITH_NPU_ACCELERATOR "ethos-u55-128"' in header
    assert "(resolver).AddEthosU();" in header and "(resolver).AddMean();" in header


@needs_vela
def test_device_record_reads_the_estimates_without_vela_and_reproduces_them_with_it(exported, monkeypatch):
    from device_tests.vela import ESTIMATE_KEYS, device_record

    out, artifacts = exported
    file = "ethos_u/ethos-u85-256/model_vela.tflite"
    entry = artifacts[file]
    again = device_record(out, entry, file, entry["sha256"])["recompiled"]
    assert again["same_bytes"] and {k: again[k] for k in ESTIMATE_KEYS} == {k: entry["npu"][k] for k in ESTIMATE_KEYS}
    monkeypatch.setitem(sys.modules, "ethosu", None)  # as on a device without Vela
    record = device_record(out, entry, file, entry["sha256"])
    assert record["recompiled"] is None and "not installed" in record["recompiled_note"]
    assert record["cycles"] == entry["npu"]["cycles"] and record["cpu_fallback"][0]["operator"] == "Mean"


@needs_vela
def test_npu_budgets_and_the_fits_on_the_npu_table(exported):
    from device_tests.vela import device_record
    from pipeline.validation.budgets import check
    from pipeline.validation.config import ValidateConfig
    from pipeline.validation.npu import npu_section
    from pipeline.validation.suite import TargetRun

    out, artifacts = exported
    npu = [device_record(out, artifacts[f], f, artifacts[f]["sha256"]) for f in artifacts if f.startswith("ethos_u/")]
    runs = [TargetRun("local", {"runs": [], "npu": npu})]
    cfg = ValidateConfig(budgets={"max_npu_ms": 1.0, "max_npu_sram_kb": 64, "max_npu_flash_kb": 64,
                                  "max_cpu_fallback_ops": 0})
    verdicts = check(runs, cfg.budgets)
    missed = {(v.artifact.split("/")[1], v.budget) for v in verdicts if not v.ok}
    assert missed == {(n, "max_cpu_fallback_ops") for n in NPUS}   # the MEAN on the CPU
    assert len(verdicts) == 4 * len(NPUS)
    section = npu_section(runs, verdicts)
    assert section.title == "Fits on the NPU" and "Vela estimates" in section.markdown
    rows = [line for line in section.markdown.splitlines() if "model_vela.tflite | ethos-u" in line]
    assert len(rows) == len(NPUS) and all("Mean (" in r and r.endswith("| NO |") for r in rows)
    assert "500 MHz" in section.markdown and "| conv3.0 (Conv2d) |" in section.markdown  # the slowest layer


@needs_vela
def test_release_bundle_carries_the_vela_model_its_c_array_ini_and_summaries(exported, tmp_path):
    from exporters.artifacts import ArtifactListing
    from pipeline.release.bundle import ReleaseSources, copy_payload
    from pipeline.release.manifest import file_entries

    out, artifacts = exported
    export = tmp_path / "export"
    shutil.copytree(out, export)
    (export / "model.onnx").write_bytes(b"stand-in: a release needs an FP32 ONNX")
    ArtifactListing(tuple(artifacts.values()), {"size": 8, "channels": 1}, ("a", "b", "c")).write(export)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    copy_payload(bundle, ReleaseSources(export, None, None, include_eval_set=False))
    entries = {e.path: e for e in file_entries(bundle)}
    for npu in NPUS:
        entry = artifacts[f"ethos_u/{npu}/model_vela.tflite"]
        assert entries[entry["file"]].sha256 == entry["sha256"]
        assert entries[entry["c_source"]].sha256 == entry["c_source_sha256"]
        for key in ("c_header", "sidecar", "vela_summary", "vela_layers", "vela_ini", "vela_input"):
            assert entry[key] in entries, key
