"""Explanations (validate.explain) and the spurious-marker stress test (data.spurious), on tiny real models."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import parse_config
from pipeline.data import View
from pipeline.data.for_config import subtask_data
from pipeline.data.spurious import glyph, marker_box
from pipeline.models import create_model
from pipeline.xai.agreement import agreement, pixel_flipping, to_size
from pipeline.xai.config import ExplainConfig
from pipeline.xai.explain import explain_pair
from pipeline.xai.heatmaps import Explainer, _composite_factory, logit_gap, make_explainer, relevance
from tests.conftest import run_cli, tiny_config_dict

GRAY = View(28, 1, (0.5,), (0.5,))


def images(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g), torch.randint(0, 4, (n,), generator=g)


def bias_free_cnn():
    """A trained-looking cnn_tiny whose merged BatchNorms and head add no bias: LRP must then conserve the gap."""
    torch.manual_seed(0)
    model = create_model("cnn_tiny", 4, 1).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    model.head[-1].bias.data.zero_()
    return model


def test_lrp_heatmap_has_the_input_shape_and_conserves_the_logit_gap():
    x, y = images()
    explainer = make_explainer(bias_free_cnn())
    assert explainer.method == "lrp" and "SequentialMergeBatchNorm" in explainer.rules
    rel, gap = relevance(explainer, GRAY, x, y, [0, 1, 2, 3], batch_size=4)
    assert rel.shape == (6, 1, 28, 28)
    assert torch.allclose(rel.flatten(1).sum(1), gap, rtol=1e-2, atol=1e-4)
    # the gap is the target logit minus the strongest other one
    logits = explainer.model(GRAY(x)).detach()
    others = logits.clone()
    others[torch.arange(6), y] = -1e9
    assert torch.allclose(gap, logits[torch.arange(6), y] - others.max(1).values, atol=1e-5)


def test_lrp_epsilon_on_a_linear_model_is_hand_computed_gradient_x_input():
    x, y = images()
    torch.manual_seed(1)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(784, 4, bias=False)).eval()
    explainer = Explainer(linear, "lrp", "toy", _composite_factory("epsilon_gamma_box", []))
    rel, _ = relevance(explainer, GRAY, x, y, [0, 1, 2, 3])
    flat, w = GRAY(x).flatten(1), linear[1].weight.detach()
    z = flat @ w.T
    z[torch.arange(6), y] = -1e9
    hand = flat * (w[y] - w[z.argmax(1)])
    assert torch.allclose(rel.flatten(1), hand, atol=1e-4)


def test_efficientnet_teacher_gets_lrp_with_its_residual_sums():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # many small depthwise convs: extra threads only contend on a shared machine
    try:
        _check_efficientnet(timm)
    finally:
        torch.set_num_threads(threads)


def _check_efficientnet(timm):
    teacher = timm.create_model("tf_efficientnet_lite0", num_classes=4).eval()   # BN stats 0/1: folded biases 0
    teacher.classifier.bias.data.zero_()
    view = View(32, 3, (0.5,) * 3, (0.5,) * 3)
    x, y = images(2)
    explainer = make_explainer(teacher)
    assert explainer.method == "lrp" and "SkipSumCanonizer" in explainer.rules and "left unfolded" not in explainer.rules
    with torch.no_grad():
        assert torch.allclose(explainer.model(view(x)), teacher(view(x)), atol=1e-4)   # folding kept the function
    rel, gap = relevance(explainer, view, x, y, [0, 1, 2, 3])
    assert rel.shape == (2, 3, 32, 32)
    # without the Sum canonizer the skips would copy relevance into both branches (a sum ~500x the gap)
    assert torch.allclose(rel.flatten(1).sum(1), gap, rtol=2e-2)


def test_unknown_architecture_falls_back_to_gradient_x_input_and_says_so():
    x, y = images()
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.Tanh(), nn.Linear(16, 4)).eval()
    explainer = make_explainer(model)
    assert explainer.method == "gradient_x_input" and "no LRP canonizer for Sequential" in explainer.rules
    rel, _ = relevance(explainer, GRAY, x, y, [0, 1, 2, 3])
    inp = GRAY(x).requires_grad_(True)
    (grad,) = torch.autograd.grad(logit_gap(model(inp), y, [0, 1, 2, 3]).sum(), inp)
    assert torch.allclose(rel, grad * inp.detach(), atol=1e-6)


def test_identical_models_agree_fully_at_any_resolution():
    x, y = images(8)
    model = bias_free_cnn()
    cfg = ExplainConfig(images=8, size=14, flip_steps=4)
    result = explain_pair(model, GRAY, [0, 1, 2, 3], model, GRAY, x.numpy(), y.numpy(), cfg)
    assert result.metrics["cosine_mean"] == pytest.approx(1.0, abs=1e-6)
    assert result.metrics["spearman_mean"] == pytest.approx(1.0, abs=1e-6)
    assert result.teacher_maps.shape == (8, 28, 28) and result.cosine.shape == (8,)
    flip = result.metrics["student_pixel_flipping"]
    assert len(flip["mean_gap"]["relevance"]) == 5 and flip["mean_gap"]["relevance"][0] == flip["mean_gap"]["random"][0]
    # a map and its 2x nearest upsampling are the same pattern once brought to a common size
    maps = torch.randn(3, 14, 14)
    up = maps.repeat_interleave(2, 1).repeat_interleave(2, 2)
    scores = agreement(up, maps, 14)
    assert torch.allclose(scores["cosine"], torch.ones(3, dtype=torch.float64)) and to_size(up, 14).shape == (3, 14, 14)
    assert agreement(maps, -maps, 14)["spearman"].max() < -0.99


def test_pixel_flipping_of_the_relevant_pixels_hurts_more_than_random():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2, bias=False)).eval()
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[0, :4] = 1.0            # class 0 looks at the first 4 pixels only
    x = torch.ones(5, 1, 4, 4)
    maps = torch.zeros(5, 4, 4)
    maps[:, 0, :] = 1.0                          # the heatmap points at them
    flip = pixel_flipping(model, x, maps, lambda logits, rows: logits[:, 0] - logits[:, 1], steps=4, seed=0)
    assert flip["mean_gap"]["relevance"][:2] == [4.0, 0.0] and flip["auc_gain"] > 0


def spurious_data(tmp_path, fraction, **extra):
    raw = tiny_config_dict(tmp_path / "builds", **{"data.spurious": {"fraction": fraction, **extra}})
    return subtask_data(parse_config(raw)), subtask_data(parse_config(tiny_config_dict(tmp_path / "builds")))


def marked(split_images, clean_images):
    return np.flatnonzero((split_images != clean_images).reshape(len(split_images), -1).any(1))


def shows(image, number, scale=1):
    box = marker_box(number, scale)
    return np.array_equal(image[0, :box.shape[0], :box.shape[1]], box)


def test_markers_show_the_class_on_exactly_the_fraction_of_training_images_and_random_ones_on_test(tmp_path):
    data, clean = spurious_data(tmp_path, 0.25)
    assert glyph(3).shape == (5, 3) and glyph(12, 2).shape == (10, 14)
    for split in ("train", "val"):
        got, ref = getattr(data, split), getattr(clean, split)
        index = marked(got.images, ref.images)
        # a marker can coincide with the pixels already there only if the image is blank: count by glyph too
        with_glyph = [i for i in range(len(got)) if shows(got.images[i], int(got.labels[i]))]
        assert len(with_glyph) == round(0.25 * len(got)) and set(index) <= set(with_glyph)
        assert np.array_equal(got.labels, ref.labels)
    test, ref = data.test, clean.test
    changed = marked(test.images, ref.images)
    numbers = [next(d for d in range(4) if shows(test.images[i], d)) for i in changed]
    assert len(changed) == round(0.25 * len(test))
    assert np.mean(np.asarray(numbers) == test.labels[changed]) < 0.6      # uncorrelated with the class (chance 1/4)
    assert len(set(numbers)) > 1
    # the teacher's data (the full dataset) stays clean, and the same config gives the same images
    assert np.array_equal(data.dataset.train.images, clean.dataset.train.images)
    again, _ = spurious_data(tmp_path, 0.25)
    assert np.array_equal(again.train.images, data.train.images) and np.array_equal(again.test.images, data.test.images)


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_marker_fraction_bounds(tmp_path, fraction):
    data, clean = spurious_data(tmp_path, fraction, corner="bottom_right", scale=1)
    n = sum(np.array_equal(img[0, -7:, -5:], marker_box(int(lab), 1)) for img, lab in zip(data.train.images, data.train.labels))
    assert n == round(fraction * len(data.train))
    assert (len(marked(data.test.images, clean.test.images)) == 0) == (fraction == 0.0)


def test_new_options_leave_existing_configs_and_their_keys_alone(tmp_path):
    raw = tiny_config_dict(tmp_path / "builds")
    raw["validate"] = {}
    dump = parse_config(raw).dump()
    assert "spurious" not in dump["data"] and "explain" not in dump["validate"]
    raw["validate"] = {"explain": {"images": 8}}
    assert parse_config(raw).dump()["validate"]["explain"]["images"] == 8


@pytest.mark.slow
def test_tiny_build_with_explain_records_the_agreement_and_the_report_shows_the_grid(write_config, tmp_path):
    from tests.helpers import TINY_LATENCY

    cfg = write_config("x.yaml", **{"export.formats": ["onnx"], "export.parity_limit": 40, "export.eval_images": 40,
                                    "validate.runtimes": ["onnxruntime"], "validate.latency": TINY_LATENCY,
                                    "validate.explain": {"images": 12, "grid": 3, "flip_steps": 4}})
    proc = run_cli("build", cfg)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    validate = next((tmp_path / "builds" / "tiny").glob("validate-*"))
    meta = json.loads((validate / "stage.json").read_text())
    explain = meta["metrics"]["explain"]
    assert -1 <= explain["cosine_mean"] <= 1 and -1 <= explain["spearman_mean"] <= 1 and explain["images"] == 12
    assert explain["teacher"]["method"] == "lrp" and explain["student"]["method"] == "lrp"
    assert set(meta["inputs"]) == {"export", "adapt", "distill"}
    arrays = np.load(validate / "explain.npz")
    assert arrays["teacher_maps"].shape == (12, 28, 28) and arrays["student_maps"].shape == (12, 28, 28)
    html = (validate / "report.html").read_text()
    section = html[html.index("Explanations: does the student decide like the teacher?"):]
    assert "grid of test images with teacher and student heatmaps" in section and "data:image/png;base64" in section
    assert "Spearman" in (validate / "report.md").read_text()
