"""The qat and export stages on a tiny real build: Fashion-MNIST (a few hundred images), trained tiny CNNs,
real NNCF, ONNX Runtime and OpenVINO. The upstream stage folders are written in their documented format."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from pipeline.config import parse_config
from pipeline.data import View, batches
from pipeline.data.for_config import subtask_data
from pipeline.data.views import as_tensor
from pipeline.errors import ConfigError
from pipeline.models import StudentSpec, TeacherSpec, create_model, save_model
from pipeline.progress import ProgressDisplay
from pipeline.stage import StageContext, StageRecord

CLASSES = ["T-shirt/top", "Pullover", "Shirt", "Coat"]
VIEW = View(28, 1, (0.5,), (0.5,))


def tiny_config(**sections):
    raw = {"build": {"name": "tiny", "threads": 2},
           "data": {"train_per_class": 150, "test_per_class": 60},
           "subtask": {"classes": CLASSES},
           "teacher": {"source": "train", "train": {"arch": "cnn_tiny"}},
           "student": {"arch": "cnn_tiny"},
           "distill": {"temperature": 4.0, "label_weight": 0.5},
           "qat": {"calibration_size": 64, "epochs": 1, "lr": 1e-4, "batch_size": 32},
           "export": {"formats": ["onnx", "onnx_int8", "openvino", "tensorrt"], "parity_limit": 200,
                      "eval_images": 100}}
    raw.update(sections)
    return parse_config(raw)


def train(model, images, labels, epochs=6, lr=3e-3, seed=0):
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = as_tensor(images), torch.as_tensor(labels)
    for _ in range(epochs):
        model.train()
        for idx in batches(len(x), 32, shuffle=True, generator=torch.Generator().manual_seed(seed)):
            loss = torch.nn.functional.cross_entropy(model(VIEW(x[idx])), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def record(name, folder):
    return StageRecord(name, f"{name}-key", folder, {"metrics": {}})


def context(cfg, out, inputs):
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(cfg, out, inputs, ProgressDisplay(enabled=False), key="test")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """adapt/ and distill/ folders as the lead's stages write them (teacher.pt/json, student.pt/json)."""
    cfg = tiny_config()
    data = subtask_data(cfg)
    root = tmp_path_factory.mktemp("build")
    adapt, distill = root / "adapt", root / "distill"
    adapt.mkdir(), distill.mkdir()
    teacher = create_model("cnn_tiny", 10, 1)
    ids = np.asarray(data.class_ids)
    train(teacher, data.train.images, ids[data.train.labels])
    save_model(teacher, adapt, TeacherSpec("cnn_tiny", 10, VIEW, tuple(data.dataset.class_names)))
    student = train(create_model("cnn_tiny", 4, 1), data.train.images, data.train.labels, seed=1)
    ids = tuple(int(i) for i in data.class_ids)
    save_model(student, distill, StudentSpec("cnn_tiny", 4, VIEW, tuple(data.class_names), VIEW, ids, ids, 0, 0))
    return root, {"adapt": record("adapt", adapt), "distill": record("distill", distill)}


@pytest.fixture(scope="module")
def qat_run(upstream):
    from pipeline.stages.qat import QATStage

    root, inputs = upstream
    cfg = tiny_config()
    ctx = context(cfg, root / "qat", inputs)
    metrics = QATStage().run(ctx)
    return ctx.out, metrics


@pytest.fixture(scope="module")
def export_run(upstream, qat_run):
    from pipeline.stages.export import ExportStage

    root, inputs = upstream
    cfg = tiny_config()
    inputs = {**inputs, "qat": record("qat", qat_run[0])}
    ctx = context(cfg, root / "export", inputs)
    metrics = ExportStage().run(ctx)
    return ctx.out, metrics, json.loads((ctx.out / "artifacts.json").read_text())


def artifact(listing, file):
    return next(a for a in listing["artifacts"] if a["file"] == file)


def test_qat_stage_writes_a_reloadable_quantized_model(qat_run, upstream):
    from quantize.model_io import load_quantized_student
    from quantize.qat import model_accuracy

    out, metrics = qat_run
    assert {p.name for p in out.iterdir()} >= {"quantized.pt", "quantized.nncf.json", "quantized.json"}
    assert metrics["fold_max_abs_diff"] < 1e-4 and metrics["batchnorm_not_folded"] == []
    # best-on-validation starts from the calibrated model, so QAT never ends below PTQ on validation
    assert metrics["int8_val_acc"] >= metrics["ptq_val_acc"]
    assert metrics["int8_val_acc"] == max(metrics["qat_val_history"])
    model, spec = load_quantized_student(out)
    data = subtask_data(tiny_config())
    assert model_accuracy(model, VIEW, data.test.images, data.test.labels) == pytest.approx(metrics["int8_test_acc"])
    assert metrics["fp32_test_acc"] > 0.5  # the tiny student learned something (chance: 0.25)


def test_ptq_mode_skips_finetuning(upstream, tmp_path):
    from pipeline.stages.qat import QATStage

    _, inputs = upstream
    cfg = tiny_config(qat={"mode": "ptq", "calibration_size": 32})
    metrics = QATStage().run(context(cfg, tmp_path / "qat", inputs))
    assert "qat_val_history" not in metrics
    assert metrics["int8_val_acc"] == metrics["ptq_val_acc"]


def test_export_writes_every_artifact_with_parity(export_run):
    out, metrics, listing = export_run
    files = {a["file"]: a for a in listing["artifacts"]}
    assert set(files) == {"model.onnx", "model.int8.onnx", "openvino/model.xml", "openvino/model.int8.xml",
                          "tensorrt/build_engine.sh"}
    for a in listing["artifacts"]:
        assert (out / a["file"]).stat().st_size == a["size"]
        assert (out / a["sidecar"]).is_file()
    fp32 = files["model.onnx"]["parity"]
    assert fp32["max_abs_logit_diff"] < 1e-3 and fp32["top1_agreement"] == 1.0
    int8 = files["model.int8.onnx"]["parity"]
    # ONNX Runtime's INT8 kernels vs NNCF's fake-quant: same accuracy within 0.2 points
    assert abs(int8["accuracy"] - int8["reference_accuracy"]) <= 0.002 + 1e-9
    assert int8["top1_agreement"] >= 0.99
    for ir in ("openvino/model.xml", "openvino/model.int8.xml"):
        assert files[ir]["parity"]["top1_agreement"] >= 0.99
    assert (out / "openvino/model.bin").is_file() and (out / "openvino/model.int8.bin").is_file()
    assert set(metrics["artifacts"]) == set(files)
    assert metrics["val_accuracy"]["model.int8.onnx"] == int8["accuracy"]
    assert metrics["min_top1_agreement"] >= 0.99


def test_int8_onnx_holds_qdq_pairs_and_onnxruntime_fuses_them(export_run):
    out, _, listing = export_run
    ops = [n.op_type for n in onnx.load(str(out / "model.int8.onnx")).graph.node]
    assert ops.count("QuantizeLinear") >= 3 and ops.count("DequantizeLinear") >= ops.count("QuantizeLinear")
    fused = artifact(listing, "model.int8.onnx")["onnxruntime_ops"]
    assert fused.get("QLinearConv", 0) >= 2 and "Conv" not in fused
    assert artifact(listing, "model.int8.onnx")["onnxruntime_int8_conv_fraction"] == 1.0


def test_int8_onnx_stores_int8_weights_and_is_smaller(export_run):
    out, _, _ = export_run
    inits = onnx.load(str(out / "model.int8.onnx")).graph.initializer
    assert sum(t.data_type == onnx.TensorProto.INT8 for t in inits) >= 3


def test_onnx_files_pass_the_checker_and_carry_metadata(export_run):
    from exporters.metadata import artifact_config_digest, read_onnx_metadata
    from exporters.openvino_ir import read_ir_metadata

    out, _, listing = export_run
    for name, precision in (("model.onnx", "fp32"), ("model.int8.onnx", "int8")):
        onnx.checker.check_model(str(out / name), full_check=True)
        meta = read_onnx_metadata(out / name)
        assert meta["class_names"] == CLASSES and meta["precision"] == precision
        assert meta["preprocessing"]["mean"] == [0.5] and meta["input"]["shape"] == ["batch", 1, 28, 28]
        assert meta["artifact_config_sha256"] == artifact_config_digest(tiny_config()) and meta["build_key"] == "test"
        assert "onnxruntime" in meta["versions"]
        assert json.loads((out / f"{name}.json").read_text())["precision"] == precision
    assert read_ir_metadata(out / "openvino/model.int8.xml")["precision"] == "int8"
    assert listing["preprocessing"]["size"] == 28


def test_onnx_dynamic_batch_runs_any_batch(export_run):
    import onnxruntime as ort

    out, _, _ = export_run
    session = ort.InferenceSession(str(out / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 7):
        assert session.run(None, {"input": np.zeros((n, 1, 28, 28), np.float32)})[0].shape == (n, 4)


def test_eval_set_for_the_device_tests(export_run):
    out, _, listing = export_run
    with np.load(out / "eval.npz") as npz:
        arrays = dict(npz)
    assert arrays["images_u8"].dtype == np.uint8 and arrays["images_u8"].shape == (100, 1, 28, 28)
    assert set(arrays) == {"images_u8", "labels", "teacher_pred", "fp32_pred", "int8_pred"}
    assert listing["eval_set"]["accuracy"]["fp32"] == pytest.approx(float((arrays["fp32_pred"] == arrays["labels"]).mean()))


def test_tensorrt_records_an_on_device_build(export_run):
    out, _, listing = export_run
    trt = artifact(listing, "tensorrt/build_engine.sh")
    assert trt["format"] == "tensorrt_build" and trt["engine"] == "build on device"
    assert trt["source_onnx"] == "model.int8.onnx" and trt["reason"]
    plan = subprocess.run([sys.executable, str(out / "tensorrt/build_engine.py"), "--dry-run"],
                          capture_output=True, text=True, check=True)
    steps = json.loads(plan.stdout)
    assert steps["onnx"] == str((out / "model.int8.onnx").resolve()) and steps["strongly_typed"]


def test_tensorrt_alone_still_ships_the_onnx_it_builds_from(upstream, qat_run, tmp_path):
    from pipeline.stages.export import ExportStage

    _, inputs = upstream
    cfg = tiny_config(export={"formats": ["tensorrt"], "parity_limit": 50, "eval_images": 20,
                              "tensorrt": {"precision": "fp16"}})
    ExportStage().run(context(cfg, tmp_path / "trt", {**inputs, "qat": record("qat", qat_run[0])}))
    listing = json.loads((tmp_path / "trt/artifacts.json").read_text())
    assert [(a["file"], a["format"]) for a in listing["artifacts"]] == [
        ("model.onnx", "onnx"), ("tensorrt/build_engine.sh", "tensorrt_build")]
    assert artifact(listing, "model.onnx")["parity"]["top1_agreement"] == 1.0


def test_reexport_gives_identical_bytes(upstream, qat_run, export_run, tmp_path):
    from pipeline.stages.export import ExportStage

    _, inputs = upstream
    first, _, listing = export_run
    ExportStage().run(context(tiny_config(), tmp_path / "again", {**inputs, "qat": record("qat", qat_run[0])}))
    again = json.loads((tmp_path / "again/artifacts.json").read_text())
    assert [(a["file"], a["sha256"]) for a in again["artifacts"]] == [(a["file"], a["sha256"]) for a in listing["artifacts"]]
    for name in ("eval.npz", "artifacts.json", "openvino/model.bin", "model.int8.onnx.json", "tensorrt/build_options.json"):
        assert (first / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_artifact_config_hash_ignores_sections_read_after_export():
    from exporters.metadata import artifact_config_digest

    base = tiny_config()
    later = tiny_config(release={"version": "9.9.9"})
    assert artifact_config_digest(base) == artifact_config_digest(later)
    assert artifact_config_digest(base) != artifact_config_digest(tiny_config(export={"opset": 18}))
    assert artifact_config_digest(later) != later.digest()  # the whole config's hash: another key, another value


def test_int8_format_without_qat_section_is_a_config_error():
    raw = tiny_config().dump()
    raw["qat"] = None
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert "INT8 artifacts (onnx_int8, tensorrt)" in err.value.problem and "no qat section" in err.value.problem
    raw["export"] = {"formats": ["onnx", "tensorrt"], "tensorrt": {"precision": "fp16"}}
    assert parse_config(raw).qat is None  # FP32 and FP16 formats need no INT8 model


def test_unknown_format_name_is_a_config_error_with_its_key_path():
    with pytest.raises(ConfigError) as err:
        tiny_config(export={"formats": ["onnx", "openvion"]})
    assert "export.formats" in err.value.problem and "Did you mean 'openvino'" in err.value.problem
