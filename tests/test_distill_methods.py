"""Distillation methods and layer pairing: SubDistill's student side, the baselines' named losses, pair errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data import View
from pipeline.data.base import ImageSet
from pipeline.distill.config import DistillConfig
from pipeline.distill.features import PairSpec, as_map, auto_pairs, pool_to, resolve_pairs, stage_names, tap_features
from pipeline.distill.matching import Rotations, SubspaceMatch, pair_target, subspace_match_reference, tangent
from pipeline.distill.methods import METHODS, MeanCentre, Outputs, SubDistill
from pipeline.distill.subspace import Moments, Subspace, accumulate, save_subspaces
from pipeline.distill.train import DistillSettings, Models, TeacherOutputs, distill, layer_pairs
from pipeline.errors import ConfigError, ModelError
from pipeline.models import create_model
from pipeline.progress import ProgressDisplay

LAYER_METHODS = ("subdistill", "fitnet", "attention", "vkd")


def subspace_from_maps(teacher_maps: torch.Tensor, k: int, seed: int = 0) -> Subspace:
    """Estimate from every position of the maps (gradients: a fixed random linear function of them)."""
    rows = teacher_maps.permute(0, 2, 3, 1).reshape(-1, teacher_maps.shape[1]).double()
    grads = rows @ torch.randn(rows.shape[1], rows.shape[1], generator=torch.Generator().manual_seed(seed),
                               dtype=torch.float64)
    moments = Moments(rows.shape[1])
    moments.add(rows, grads)
    return Subspace.from_moments(moments, k, "subdistill", seed)


def make_subdistill(tmp_path, teacher_maps: torch.Tensor, k: int, size=(4, 4), **cfg) -> SubDistill:
    pair = PairSpec("t", "s", teacher_maps.shape[1], k, tuple(teacher_maps.shape[-2:]), size)
    save_subspaces(tmp_path, [pair], [subspace_from_maps(teacher_maps, k)], {"basis": "subdistill"})
    return SubDistill(DistillConfig(method="subdistill", **cfg), pairs=[pair], subspaces_dir=tmp_path)


def teacher_maps(n=16, d=10, size=4, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g)
    return torch.einsum("nchw,cd->ndhw", torch.randn(n, d, size, size, generator=g), mix) + 1.5


def test_teacher_target_is_the_centred_projection_in_float64(tmp_path):
    maps = teacher_maps()
    method = make_subdistill(tmp_path, maps, k=3)
    target = method.teacher_target(0, maps)
    basis, mean = method.basis0.double(), method.mean0.double()
    reference = torch.einsum("ndhw,dk->nkhw", maps.double() - mean.view(1, -1, 1, 1), basis)
    assert target.shape == (16, 3, 4, 4)            # k channels per position are cached, not d
    torch.testing.assert_close(target.double(), reference, atol=1e-4, rtol=1e-4)


def test_student_reproducing_the_teacher_subspace_has_zero_layer_loss(tmp_path):
    maps = teacher_maps()
    method = make_subdistill(tmp_path, maps, k=3).train()
    target = method.teacher_target(0, maps)
    rotation = method.rotations[0].detach()
    # Any per-channel offset is removed by the mean-centring; V^T undoes the learned rotation.
    student = torch.einsum("nkhw,kj->njhw", target, rotation) + torch.tensor([5.0, -2.0, 0.5]).view(1, 3, 1, 1)
    perfect = method.pair_loss(0, student, target)
    zero = method.pair_loss(0, torch.zeros_like(student), target)
    noise = method.pair_loss(0, torch.randn_like(student), target)
    assert float(perfect.detach()) < 1e-4
    assert float(zero.detach()) == pytest.approx(1.0, abs=0.05)   # predicting nothing costs about 1 (normalised by alpha)
    assert float(noise.detach()) > 1.0


def test_layer_loss_and_its_gradients_match_the_direct_formula_in_float64(tmp_path):
    maps = teacher_maps()
    method = make_subdistill(tmp_path, maps, k=3).train()
    with torch.no_grad():                       # a rotation away from the identity, so V matters
        method.rotations.weight[0].copy_(torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1)))[0])
    target = method.teacher_target(0, maps)
    student = torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(2), requires_grad=True)
    loss = method.pair_loss(0, student, target)
    loss.backward()
    # Reference: centre by the batch mean, rotate the target by V^T, squared error per position / alpha.
    s = student.detach().double().requires_grad_(True)
    centred = s - s.mean(dim=(0, 2, 3), keepdim=True)
    rotated = torch.einsum("nkhw,kj->njhw", target.double(), method.rotations[0].detach().double())
    reference = (centred - rotated).pow(2).sum() / (16 * 4 * 4) / method.alpha0.double()
    reference.backward()
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-5)
    torch.testing.assert_close(student.grad.double(), s.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("shape", [(5, 4, 3, 7), (6, 8, 1, 2)])   # many positions (batched GEMM) and few (P < k)
def test_closed_form_gradients_equal_autograd_of_the_centred_loss_in_float64(shape):
    # The training path's hand-written backward, for two pairs in one op, against autograd through MeanCentre and
    # the direct formula ||V c - t~||^2: the students' gradients exactly; V's on the tangent space of the orthogonal
    # matrices, which is all an orthogonality-keeping optimizer uses (the two formulas agree only on the manifold).
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    n, k, h, w = shape
    shapes = [shape, (n, 2, 2, 3)]
    students = [torch.randn(*s, generator=g, dtype=torch.float64) * 2 + 1 for s in shapes]
    targets = [torch.randn(*s, generator=g, dtype=torch.float64) + 0.5 for s in shapes]
    rotations = Rotations([k, 2]).double()
    with torch.no_grad():                       # orthogonal to float64 precision, as the identity needs
        for i, k_i in enumerate(rotations.sizes):
            rotations.weight[i, :k_i, :k_i] = torch.linalg.qr(torch.randn(k_i, k_i, generator=g, dtype=torch.float64))[0]
    mine = [s.clone().requires_grad_(True) for s in students]
    theirs = [s.clone().requires_grad_(True) for s in students]
    flat = [x for s, t in zip(mine, targets) for x in (s.flatten(2), *pair_target(t))]
    fused, *means = SubspaceMatch.apply(rotations.weight, rotations.groups_of([0, 1]), *flat)
    blocks = [rotations[i].detach().clone().requires_grad_(True) for i in range(2)]
    reference = torch.stack([subspace_match_reference(MeanCentre(s.shape[1]).double().train()(s), t, v) / s[:, 0].numel()
                             for s, t, v in zip(theirs, targets, blocks)])
    weights = torch.tensor([0.7, 1.3], dtype=torch.float64)
    (fused * weights).sum().backward()
    (reference * weights).sum().backward()
    torch.testing.assert_close(fused.detach(), reference.detach(), rtol=1e-12, atol=0)
    expected_grad = torch.zeros_like(rotations.weight)
    for i, (k_i, s) in enumerate(zip(rotations.sizes, students)):
        torch.testing.assert_close(means[i], s.mean(dim=(0, 2, 3)))
        torch.testing.assert_close(mine[i].grad, theirs[i].grad, atol=1e-10, rtol=1e-10)
        expected_grad[i, :k_i, :k_i] = tangent(blocks[i].detach(), blocks[i].grad)
    torch.testing.assert_close(rotations.weight.grad, expected_grad, atol=1e-10, rtol=1e-10)   # zero off the blocks

    def first(s):
        return SubspaceMatch.apply(rotations.weight.detach(), rotations.groups_of([0]), s.flatten(2),
                                   *pair_target(targets[0]))[0]
    assert torch.autograd.gradcheck(first, (students[0].clone().requires_grad_(True),))


def test_training_step_updates_the_running_mean_like_mean_centre(tmp_path):
    maps = teacher_maps()
    method = make_subdistill(tmp_path, maps, k=3).train()
    target = method.teacher_target(0, maps)
    student = torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(4)) + 3.0
    reference = MeanCentre(3).train()
    for _ in range(3):
        method.pair_loss(0, student, target)
        reference(student)
    torch.testing.assert_close(method.centre[0].running_mean, reference.running_mean)
    method.eval()                               # eval centres by the running mean: a different, larger loss
    assert float(method.pair_loss(0, student, target).detach()) > float(method.train().pair_loss(0, student, target).detach())


@pytest.mark.parametrize("seed", [0, 18, 75, 100])   # initial V; 18, 75, 100 need > 4 iterations at scale 0.1
@pytest.mark.parametrize("scale", [1e-3, 0.1, 0.3, 3.0])   # an optimizer step away, far away (Newton-Schulz), way off (SVD)
def test_retraction_returns_each_block_to_the_nearest_orthogonal_matrix(scale, seed):
    torch.manual_seed(seed)
    rotations = Rotations([3, 5])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for i, k in enumerate(rotations.sizes):
            rotations.weight[i, :k, :k] += scale * torch.randn(k, k, generator=g)
    moved = [rotations[i].detach().double().clone() for i in range(2)]
    rotations.retract_()
    for i, k in enumerate(rotations.sizes):
        weight = rotations[i].detach()
        torch.testing.assert_close(weight.T @ weight, torch.eye(k), atol=2e-5, rtol=0)
        u, _, vh = torch.linalg.svd(moved[i])                  # the polar factor: nearest in Frobenius norm
        torch.testing.assert_close(weight.double(), u @ vh, atol=1e-4, rtol=0)
    torch.testing.assert_close(rotations.weight[0, 3:, 3:].detach(), torch.eye(2))   # padding stays identity
    assert float(rotations.weight[0, :3, 3:].detach().abs().max()) == 0.0


def test_rotation_stays_orthogonal_after_optimizer_steps(tmp_path):
    maps = teacher_maps()
    method = make_subdistill(tmp_path, maps, k=4).train()
    target = method.teacher_target(0, maps)
    student = torch.randn(16, 4, 4, 4, requires_grad=True)
    optimizer = torch.optim.AdamW([student, *method.parameters()], lr=0.05)
    before = method.rotations[0].detach().clone()
    losses = []
    for _ in range(30):
        loss = method.pair_loss(0, student, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.after_step()                     # the retraction, as the distill loop calls it
        losses.append(float(loss.detach()))
    weight = method.rotations[0].detach()
    torch.testing.assert_close(weight.T @ weight, torch.eye(4), atol=1e-5, rtol=0)
    assert not torch.allclose(weight, before, atol=1e-3)
    assert losses[-1] < 0.8 * losses[0]


def test_mean_centre_uses_batch_mean_in_training_and_running_mean_in_eval():
    centre = MeanCentre(2)
    x = torch.stack([torch.full((3, 3), 4.0), torch.full((3, 3), -2.0)]).unsqueeze(0).repeat(5, 1, 1, 1)
    torch.testing.assert_close(centre(x), torch.zeros_like(x))
    torch.testing.assert_close(centre.running_mean, torch.tensor([0.4, -0.2]))
    centre.eval()
    torch.testing.assert_close(centre(x)[0, :, 0, 0], torch.tensor([3.6, -1.8]))
    assert not any(p.requires_grad for p in centre.parameters())   # no affine, no variance scaling


def cnn_pair() -> tuple[torch.nn.Module, torch.nn.Module, list[PairSpec]]:
    torch.manual_seed(0)
    teacher = create_model("cnn_small", 10, 1).eval()
    student = create_model("cnn_tiny", 3, 1)
    return teacher, student, resolve_pairs("auto", teacher, student, (1, 28), (1, 28))


def save_teacher_subspaces(folder, teacher, pairs, images: torch.Tensor, class_ids) -> None:
    """SubDistill's subspaces of `teacher` estimated on `images` (one batch), saved where the method loads them."""
    moments = accumulate(teacher, [images], pairs, class_ids, positions=20, seed=0)
    save_subspaces(folder, pairs, [Subspace.from_moments(m, p.student_channels, "subdistill", 0)
                                   for m, p in zip(moments, pairs)], {})


@pytest.mark.parametrize("name", ["kd", "student_only", *LAYER_METHODS])
def test_every_method_returns_named_losses_and_trains_its_parts(name, tmp_path):
    teacher, student, pairs = cnn_pair()
    x = torch.randn(6, 1, 28, 28)
    if name.startswith("subdistill"):
        save_teacher_subspaces(tmp_path, teacher, pairs, x, [0, 1, 2])
    method = METHODS.get(name)(DistillConfig(method=name), pairs=pairs, teacher=teacher, student=student,
                               subspaces_dir=tmp_path)
    with torch.no_grad(), tap_features(teacher, [p.teacher for p in method.pairs]) as feats:
        t_logits = teacher(x)[:, :3]
        t_feats = {i: method.teacher_target(i, f) for i, f in feats.items()}
    with tap_features(student, [p.student for p in method.pairs]) as s_feats:
        s_logits = student(x)
    losses = method(Outputs(s_logits, t_logits, torch.tensor([0, 1, 2, 0, 1, 2]), dict(s_feats), t_feats))
    expected = {"total", "ce"} if name == "student_only" else {"total", "kd"}
    if name in LAYER_METHODS:
        expected |= {f"layer{i}" for i in range(len(pairs))}
    assert set(losses) == expected
    layer_sum = sum(v for k, v in losses.items() if k.startswith("layer"))
    head = losses["kd"] if "kd" in losses else losses["ce"]
    expected_total = head + method.lambda_layer * layer_sum
    assert float(losses["total"].detach()) == pytest.approx(float(expected_total.detach()), rel=1e-5)
    losses["total"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())


def test_lambda_layer_defaults_per_method_and_can_be_set():
    teacher, student, pairs = cnn_pair()
    fitnet = METHODS.get("fitnet")(DistillConfig(method="fitnet"), pairs=pairs, teacher=teacher, student=student)
    attention = METHODS.get("attention")(DistillConfig(method="attention", lambda_layer=3.0), pairs=pairs)
    assert fitnet.lambda_layer == METHODS.get("fitnet").default_lambda
    assert attention.lambda_layer == 3.0


def test_auto_pairs_by_relative_depth_for_the_default_models():
    import timm

    teacher = timm.create_model("tf_efficientnet_lite0", num_classes=10)
    student = create_model("cnn_small", 4, 1)
    assert stage_names(student, 1, 28) == ["features.0", "features.1", "features.3"]
    pairs = resolve_pairs("auto", teacher, student, (3, 64), (1, 28))
    assert [(p.teacher, p.student) for p in pairs] == [("blocks.1", "features.0"), ("blocks.2", "features.1"),
                                                      ("blocks.6", "features.3")]
    assert [p.size for p in pairs] == [(16, 16), (8, 8), (2, 2)]      # the larger map is pooled to the smaller
    assert all(p.student_channels <= p.teacher_channels for p in pairs)
    assert auto_pairs(["t0", "t1"], ["s0", "s1", "s2"]) == [("t0", "s1"), ("t1", "s2")]


def test_wrong_layer_names_list_what_exists():
    teacher, student, _ = cnn_pair()
    layers = DistillConfig(layers=[{"teacher": "features.9", "student": "features.1"}]).layers
    with pytest.raises(ModelError) as err:
        resolve_pairs(layers, teacher, student, (1, 28), (1, 28))
    assert "teacher has no module named 'features.9'" in err.value.problem
    assert "features.0, features.1, features.3" in err.value.fix
    layers = DistillConfig(layers=[{"teacher": "features.3", "student": "feature.1"}]).layers
    with pytest.raises(ModelError, match="Did you mean 'features.1'"):
        resolve_pairs(layers, teacher, student, (1, 28), (1, 28))


def test_student_wider_than_teacher_layer_is_an_error():
    teacher, student, _ = cnn_pair()
    layers = DistillConfig(layers=[{"teacher": "features.0", "student": "features.1"}]).layers
    with pytest.raises(ModelError, match=r"k=16 > d=16|k <= d") as err:
        resolve_pairs(layers, student, teacher, (1, 28), (1, 28))   # roles swapped: 48 student ch vs 8
    assert "k=32 > d=8" in err.value.problem


def test_layer_method_without_pairs_is_a_config_error():
    with pytest.raises(ConfigError, match="layer pairs"):
        METHODS.get("fitnet")(DistillConfig(method="fitnet"), pairs=[])


def tiny_vit():
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             num_classes=10, embed_dim=48, num_heads=3)


def test_vit_tokens_become_a_grid_without_the_class_token():
    vit = tiny_vit()
    tokens = torch.arange(2 * 17 * 3, dtype=torch.float32).view(2, 17, 3)
    grid = as_map(tokens, vit.num_prefix_tokens)
    assert grid.shape == (2, 3, 4, 4)
    torch.testing.assert_close(grid[1, :, 0, 1], tokens[1, 2])      # token 2 = patch (0, 1), after the class token


@pytest.mark.parametrize("augment", [False, True])
def test_vit_teacher_cnn_student_subdistill_trains(tmp_path, augment):
    torch.manual_seed(0)
    teacher = tiny_vit().eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = create_model("cnn_tiny", 3, 1)
    models = Models(teacher, student, View(32, 3, (0.5,) * 3, (0.5,) * 3), View(28, 1, (0.5,), (0.5,)), [1, 4, 7])
    pairs = layer_pairs("auto", models)
    assert [(p.teacher, p.student, p.size) for p in pairs] == [("blocks.0", "features.0", (4, 4)),
                                                              ("blocks.1", "features.1", (4, 4))]
    rng = np.random.default_rng(0)
    train = ImageSet(rng.integers(0, 256, (48, 1, 28, 28), dtype=np.uint8), rng.integers(0, 3, 48))
    val = ImageSet(rng.integers(0, 256, (16, 1, 28, 28), dtype=np.uint8), rng.integers(0, 3, 16))
    images = torch.from_numpy(train.images)
    moments = accumulate(teacher, [models.teacher_view(images[i:i + 16]) for i in range(0, 48, 16)], pairs,
                         models.teacher_ids, positions=20, seed=0)
    subspaces = [Subspace.from_moments(m, p.student_channels, "subdistill", 0) for m, p in zip(moments, pairs)]
    save_subspaces(tmp_path, pairs, subspaces, {})
    cfg = DistillConfig(method="subdistill", epochs=4, batch_size=16, lr=3e-3)
    method = SubDistill(cfg, pairs=pairs, teacher=teacher, student=student, subspaces_dir=tmp_path)
    cached = TeacherOutputs(models, method, images, torch.device("cpu"), cached=True)
    assert cached.cached[1][0].shape == (48, 8, 4, 4)                  # k x h x w per image, not d x h x w
    settings = DistillSettings(cfg, 0, torch.device("cpu"), ProgressDisplay(enabled=False), augment=augment)
    result = distill(models, method, train, val, settings)      # augment: teacher targets on the fly
    first, last = result["history"][0], result["history"][-1]
    assert {"kd", "layer0", "layer1", "total"} <= set(first)
    assert last["layer0"] < first["layer0"] and last["layer1"] < first["layer1"]
    assert np.isfinite(last["total"])


@pytest.mark.parametrize("shape,size", [((2, 3, 28, 28), (16, 16)), ((2, 3, 14, 14), (8, 8)), ((1, 4, 7, 9), (2, 4))])
def test_pooling_uses_the_bins_of_adaptive_average_pooling(shape, size):
    x = torch.randn(shape, requires_grad=True)
    torch.testing.assert_close(pool_to(x, size), torch.nn.functional.adaptive_avg_pool2d(x, size))
    pool_to(x, size).sum().backward()       # every input contributes: the gradients sum to the output count
    assert float(x.grad.sum()) == pytest.approx(shape[0] * shape[1] * size[0] * size[1], rel=1e-5)
    assert pool_to(x, shape[-2:]) is x


def test_cnn_teacher_vit_student_pairs_and_trains(tmp_path):
    import timm

    torch.manual_seed(0)
    teacher = create_model("cnn_teacher", 10, 1).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, depth=2,
                                num_classes=3, embed_dim=48, num_heads=3, in_chans=1)
    view = View(28, 1, (0.5,), (0.5,))
    models = Models(teacher, student, view, view, [0, 2, 6])
    pairs = layer_pairs("auto", models)
    assert [(p.teacher, p.student, p.student_channels, p.size) for p in pairs] == [
        ("features.2", "blocks.0", 48, (4, 4)), ("features.5", "blocks.1", 48, (4, 4))]
    rng = np.random.default_rng(1)
    train = ImageSet(rng.integers(0, 256, (32, 1, 28, 28), dtype=np.uint8), rng.integers(0, 3, 32))
    cfg = DistillConfig(method="fitnet", epochs=2, batch_size=16)
    method = METHODS.get("fitnet")(cfg, pairs=pairs, teacher=teacher, student=student)
    result = distill(models, method, train, train, DistillSettings(cfg, 0, torch.device("cpu"), ProgressDisplay(enabled=False)))
    assert result["history"][-1]["layer1"] < result["history"][0]["layer1"]


def test_retired_options_name_what_replaced_them():
    from pipeline.config import parse_config
    from tests.conftest import tiny_config_dict

    with pytest.raises(ConfigError, match="subdistill_unit' was removed.*Use distill.method: subdistill"):
        METHODS.get("subdistill_unit")
    raw = tiny_config_dict("builds", **{"data.views": 4, "distill.layer_positions": 8, "distill.cache_teacher": False,
                                         "subspaces.basis": "pca"})
    with pytest.raises(ConfigError) as err:
        parse_config(raw, "old.yaml")
    message = str(err.value)
    assert "has 4 problems" in message and "unknown key" not in message
    for key in ("data.views", "distill.layer_positions", "distill.cache_teacher", "subspaces.basis"):
        assert f"{key} was removed: " in message


def lazy_subdistill_run(tmp_path, every: int | None, steps: int = 7):
    """A CNN teacher -> cnn_tiny SubDistill distillation over `steps` optimizer steps (one epoch) with
    distill.layer_every = `every`; returns which steps evaluated the layer loss and V after every step."""
    teacher, student, pairs = cnn_pair()
    for p in teacher.parameters():
        p.requires_grad_(False)
    view = View(28, 1, (0.5,), (0.5,))
    models = Models(teacher, student, view, view, [0, 2, 6])
    rng = np.random.default_rng(2)
    train = ImageSet(rng.integers(0, 256, (8 * steps, 1, 28, 28), dtype=np.uint8), rng.integers(0, 3, 8 * steps))
    save_teacher_subspaces(tmp_path, teacher, pairs, models.teacher_view(torch.from_numpy(train.images)),
                           models.teacher_ids)
    cfg = DistillConfig(method="subdistill", epochs=1, batch_size=8, lr=1e-2, layer_every=every)
    method = SubDistill(cfg, pairs=pairs, teacher=teacher, student=student, subspaces_dir=tmp_path)
    with_layers, rotations = [], []
    layer_losses, after_step = method.layer_losses, method.after_step

    def recording_layer_losses(out):
        with_layers.append(method.steps - 1)          # begin_step has counted this step already
        return layer_losses(out)

    def recording_after_step():
        after_step()
        rotations.append(method.rotations.weight.detach().clone())

    method.layer_losses, method.after_step = recording_layer_losses, recording_after_step
    result = distill(models, method, train, train, DistillSettings(cfg, 0, torch.device("cpu"),
                                                                   ProgressDisplay(enabled=False)))
    return with_layers, rotations, result["history"][0]


def test_a_lazy_layer_loss_runs_on_every_nth_step_and_only_then_moves_v(tmp_path):
    with_layers, rotations, history = lazy_subdistill_run(tmp_path, every=3)
    assert with_layers == [0, 3, 6]
    moved = [not torch.equal(after, before) for before, after in zip(rotations, rotations[1:])]
    assert moved == [False, False, True, False, False, True]     # steps 1..6: V moves on 3 and 6 only
    assert {"layer0", "layer1", "kd", "total"} <= set(history) and np.isfinite(history["layer0"])
    (tmp_path / "every").mkdir()
    every_step, _, _ = lazy_subdistill_run(tmp_path / "every", every=1)
    assert every_step == list(range(7))


def test_a_lazy_layer_loss_weighs_n_times_in_training_and_once_in_eval(tmp_path):
    teacher, student, pairs = cnn_pair()
    x = torch.randn(6, 1, 28, 28)
    save_teacher_subspaces(tmp_path, teacher, pairs, x, [0, 1, 2])
    method = SubDistill(DistillConfig(method="subdistill", layer_every=3), pairs=pairs, subspaces_dir=tmp_path)
    with torch.no_grad(), tap_features(teacher, [p.teacher for p in pairs]) as feats:
        outputs = Outputs(torch.zeros(6, 3), teacher(x)[:, :3], torch.zeros(6, dtype=torch.long), {},
                          {i: method.teacher_target(i, f) for i, f in feats.items()})
    with torch.no_grad(), tap_features(student, [p.student for p in pairs]) as s_feats:
        outputs.student_logits = student(x)
    outputs.student_feats = dict(s_feats)
    for training, weight in ((True, 3), (False, 1)):
        method.train(training)
        losses = method(outputs)
        layer_sum = sum(v for k, v in losses.items() if k.startswith("layer"))
        assert float(losses["total"]) == pytest.approx(float(losses["kd"] + weight * method.lambda_layer * layer_sum),
                                                       rel=1e-6)
    method.train()
    assert [method.begin_step() for _ in range(7)] == [True, False, False, True, False, False, True]
    assert set(method(outputs)) == {"kd", "layer0", "layer1", "total"}     # step 6: a layer step
    method.begin_step()
    assert set(method(outputs)) == {"kd", "total"}                         # step 7: KD only


def test_layer_every_is_refused_for_methods_without_a_layer_loss():
    with pytest.raises(ValueError, match="layer_every spaces out the layer loss; method 'kd' has none"):
        DistillConfig(method="kd", layer_every=4)


def test_ema_decay_ships_the_moving_average_of_every_steps_weights():
    """One optimizer step per epoch: the weights after each epoch are the steps' weights, so the average can be
    recomputed here from a run without it (the average does not change what the student trains on)."""
    decay, epochs = 0.6, 3
    rng = np.random.default_rng(2)
    train = ImageSet(rng.integers(0, 256, (24, 1, 28, 28), dtype=np.uint8), rng.integers(0, 3, 24))
    view = View(28, 1, (0.5,), (0.5,))

    def run(ema_decay, on_epoch=None):
        torch.manual_seed(0)
        teacher = create_model("cnn_teacher", 10, 1).eval()
        student = create_model("cnn_small", 3, 1)
        students.append(student)
        start = {k: v.clone() for k, v in student.state_dict().items()}
        cfg = DistillConfig(method="kd", epochs=epochs, batch_size=24, lr=0.05, ema_decay=ema_decay)
        models = Models(teacher, student, view, view, [0, 2, 6])
        method = METHODS.get("kd")(cfg, pairs=[], teacher=teacher, student=student)
        result = distill(models, method, train, train, DistillSettings(
            cfg, 0, torch.device("cpu"), ProgressDisplay(enabled=False), on_epoch=on_epoch))
        return start, student, result

    students, snapshots = [], []
    start, _, _ = run(None, on_epoch=lambda *_: snapshots.append(
        {k: v.clone() for k, v in students[0].state_dict().items()}))
    assert len(snapshots) == epochs
    expected = dict(start)
    for weights in snapshots:
        expected = {k: decay * expected[k] + (1 - decay) * w if w.is_floating_point() else w
                    for k, w in weights.items()}
    _, averaged, result = run(decay)
    assert result["best_epoch"] == epochs                   # the last epoch's average, not a pick
    for name, value in averaged.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6)
    moved = max(float((snapshots[-1][k] - expected[k]).abs().max()) for k in expected if expected[k].is_floating_point())
    assert moved > 1e-3                                     # the average is not the last step's weights
    assert "ema_decay" not in DistillConfig().model_dump()  # unset: configs without it keep their keys
