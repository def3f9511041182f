"""BN folding, NNCF PTQ, checkpoint round trip and QAT on a tiny model (real NNCF, no mocks)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.data import View
from pipeline.errors import ConfigError
from quantize.config import IgnoredScopeConfig, QATConfig
from quantize.fold import _pairs_from_sequentials, find_conv_bn_pairs, fold_batchnorm
from quantize.nncf_ops import calibration_batches, graph_nodes, load_quantized, quantize_ptq, save_quantized
from quantize.qat import TrainSet, finetune, model_accuracy


class Tiny(nn.Module):
    """Conv-BN-ReLU x2, pool, Linear on 1x8x8: small enough for every test, shaped like the real students."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()),
            nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU()),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        return self.head(self.pool(self.features(x)).flatten(1))


def trained_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen))
    return model.eval()


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return trained_stats(Tiny(), seed)


def test_fold_batchnorm_keeps_outputs_and_removes_every_bn():
    model = make_model()
    folded, left = fold_batchnorm(model)
    x = torch.randn(4, 1, 8, 8)
    assert left == []
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert torch.allclose(model(x), folded(x), atol=1e-5)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), "the original must stay untouched"


def test_fold_pairs_from_trace_and_from_layout_agree():
    model = make_model()
    expected = [("features.0.0", "features.0.1"), ("features.1.0", "features.1.1")]
    assert find_conv_bn_pairs(model) == expected
    assert _pairs_from_sequentials(model) == expected


def test_batchnorm_not_after_a_conv_is_reported_not_folded():
    class BNFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(1)
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            return self.conv(self.bn(x))

    folded, left = fold_batchnorm(trained_stats(BNFirst()))
    assert left == ["bn"]


@pytest.fixture(scope="module")
def calibration():
    gen = torch.Generator().manual_seed(1)
    return calibration_batches([torch.randn(32, 1, 8, 8, generator=gen)])


@pytest.fixture(scope="module")
def quantized(calibration):
    return quantize_ptq(fold_batchnorm(make_model())[0], calibration)


def test_ptq_inserts_quantizers_and_stays_close_to_float(quantized, calibration):
    import nncf.torch

    names = [c["hook_names_in_model"][0] for c in nncf.torch.get_config(quantized)["compression_state"]]
    assert any("conv2d" in n for n in names) and any("linear" in n for n in names)
    x = torch.cat(calibration[:8])
    float_out = fold_batchnorm(make_model())[0](x)
    diff = (quantized(x) - float_out).abs().max()
    assert 0 < diff < 0.1 * float_out.abs().max()


def test_save_and_load_round_trip_gives_identical_outputs(quantized, tmp_path):
    save_quantized(quantized, tmp_path)
    restored = load_quantized(tmp_path, lambda: fold_batchnorm(make_model(seed=7))[0])
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(restored(x), quantized(x))


def test_ignored_scope_by_type_keeps_linear_in_float(calibration):
    import nncf.torch

    model = quantize_ptq(fold_batchnorm(make_model())[0], calibration,
                         ignored_scope=IgnoredScopeConfig(types=["linear"]))
    names = [c["hook_names_in_model"][0] for c in nncf.torch.get_config(model)["compression_state"]]
    assert not any("linear" in n for n in names)
    assert any("conv2d" in n for n in names)


def test_unknown_ignored_scope_name_lists_the_real_node_names(calibration):
    with pytest.raises(ConfigError) as err:
        quantize_ptq(fold_batchnorm(make_model())[0], calibration,
                     ignored_scope=IgnoredScopeConfig(names=["features/9/conv2d/0"]))
    assert "features/9/conv2d/0" in err.value.problem
    assert "features/0/0/conv2d/0 (conv2d)" in err.value.fix


def test_graph_nodes_name_the_convolutions():
    nodes = dict(graph_nodes(make_model(), torch.zeros(1, 1, 8, 8)))
    assert nodes["features/0/0/conv2d/0"] == "conv2d"
    assert nodes["head/linear/0"] == "linear"


def test_finetune_keeps_the_best_epoch_and_learns(calibration):
    # A learnable toy task: the class is which third of the image is bright.
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (192,), generator=gen)
    images = torch.randint(0, 60, (192, 1, 8, 8), generator=gen, dtype=torch.uint8)
    for c in range(3):
        images[labels == c, :, :, c * 2:c * 2 + 3] += 180
    images, labels = images.numpy(), labels.numpy()
    view = View(8, 1, (0.5,), (0.5,))
    teacher_logits = torch.nn.functional.one_hot(torch.as_tensor(labels), 3).float() * 8
    torch.manual_seed(0)
    model = quantize_ptq(fold_batchnorm(Tiny().eval())[0],
                         calibration_batches([view(torch.as_tensor(images[:32]))]))

    def evaluate(m):
        return model_accuracy(m, view, images[:64], labels[:64])

    def loss_fn(student, teacher, y):
        return nn.functional.kl_div(student.log_softmax(1), teacher.log_softmax(1), log_target=True,
                                    reduction="batchmean")

    history = finetune(model, view, TrainSet(images, labels, teacher_logits), evaluate, loss_fn,
                       epochs=5, lr=1e-2, batch_size=32)
    assert len(history) == 6
    assert evaluate(model) == max(history)
    assert max(history) > history[0] and max(history) >= 0.6  # chance is 1/3


def test_qat_config_rejects_unknown_keys_and_bad_mode():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        QATConfig(mode="int4")
    with pytest.raises(ValidationError):
        QATConfig(calibration_sizes=10)
    assert QATConfig().fold_bn and QATConfig().ignored_scope.empty


@pytest.mark.parametrize("fold_bn", [True, False])
def test_quantized_student_round_trip_through_its_spec(tmp_path, fold_bn):
    from pipeline.data import View
    from pipeline.models import StudentSpec, create_model
    from quantize.model_io import QuantizedSpec, float_model_factory, load_quantized_student, save_quantized_student

    view = View(28, 1, (0.5,), (0.5,))
    student_spec = StudentSpec("cnn_tiny", 4, view, ("a", "b", "c", "d"), view, (0, 1, 2, 3), (0, 1, 2, 3), 0, 0)
    spec = QuantizedSpec(student_spec, fold_bn, {"mode": "ptq"})
    torch.manual_seed(0)
    student = trained_stats(create_model("cnn_tiny", 4, 1))
    float_model = fold_batchnorm(student)[0] if fold_bn else student
    model = quantize_ptq(float_model, calibration_batches([torch.randn(16, 1, 28, 28)]))
    save_quantized_student(model, tmp_path, spec)
    restored, restored_spec = load_quantized_student(tmp_path)
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(restored(x), model(x)) and restored_spec == spec
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in float_model_factory(spec)().modules())
    assert has_bn is not fold_bn


def test_timm_batchnorm_with_activation_is_folded_and_keeps_its_activation():
    from timm.layers import BatchNormAct2d

    class ConvBnAct(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3, bias=False)
            self.bn = BatchNormAct2d(8, act_layer=nn.ReLU)

        def forward(self, x):
            return self.bn(self.conv(x))

    model = trained_stats(ConvBnAct())
    folded, left = fold_batchnorm(model)
    x = torch.randn(2, 1, 8, 8)
    assert left == [] and isinstance(folded.bn, nn.Sequential)
    assert torch.allclose(model(x), folded(x), atol=1e-5)
    assert (folded(x) >= 0).all(), "the ReLU inside BatchNormAct2d survived the folding"


def test_every_batchnorm_of_a_tf_efficientnet_is_folded():
    """tf_ EfficientNets pad by the input's size in Conv2dSame (control flow fx cannot trace): all 49 BatchNorms of
    the default teacher used to stay, and its INT8 ONNX ran no convolution as QLinearConv (4.4x slower than FP32)."""
    import timm

    model = trained_stats(timm.create_model("tf_efficientnet_lite0", num_classes=4))
    folded, left = fold_batchnorm(model)
    x = torch.randn(2, 3, 64, 64)
    assert left == []
    assert torch.allclose(model(x), folded(x), atol=1e-3, rtol=1e-3)
