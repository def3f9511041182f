"""Intermediate features: tapping named modules, turning CNN maps and ViT tokens into maps, aligning their
sizes, and pairing teacher and student layers (by name, or automatically by relative depth)."""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from ..errors import ModelError
from ..registry import did_you_mean


@contextmanager
def tap_features(model: nn.Module, names: Sequence[str]) -> Iterator[dict[int, torch.Tensor]]:
    """Collect the outputs of named modules during a forward pass, keyed by position in `names`."""
    modules = dict(model.named_modules())
    store: dict[int, torch.Tensor] = {}
    hooks = [modules[name].register_forward_hook(lambda _m, _i, out, i=i: store.__setitem__(i, out))
             for i, name in enumerate(names)]
    try:
        yield store
    finally:
        for hook in hooks:
            hook.remove()


def prefix_tokens(model: nn.Module) -> int:
    """Class/register tokens in front of a ViT's patch tokens (timm: num_prefix_tokens)."""
    return int(getattr(model, "num_prefix_tokens", 1 if getattr(model, "cls_token", None) is not None else 0))


def as_map(feature: torch.Tensor, num_prefix: int = 0) -> torch.Tensor:
    """N x C x H x W maps pass through; ViT tokens N x T x D lose their prefix tokens and become N x D x g x g."""
    if feature.dim() == 4:
        return feature
    if feature.dim() != 3:
        raise ModelError(f"A tapped layer produced a {feature.dim()}-d tensor {tuple(feature.shape)}.",
                         "Pair layers whose output is a feature map (N x C x H x W) or tokens (N x T x D).")
    tokens = feature[:, num_prefix:]
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise ModelError(f"{tokens.shape[1]} patch tokens do not form a square grid.",
                         "Use a ViT with a square patch grid, or a CNN layer.")
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


def pool_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Adaptive average pooling (same bins as F.adaptive_avg_pool2d), skipped when the map already has that size.
    Written as two small matrix products: on CPU that is several times faster than adaptive_avg_pool2d (forward and
    backward) when the sizes do not divide, e.g. 28 -> 16, which the auto pairing produces."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    n, c, h, w = x.shape
    if h * w * size[0] * size[1] <= SMALL_MAP_PRODUCT:
        # Small maps: one GEMM with the 2-d pooling matrix (a Kronecker product) beats two products and a
        # transposed copy, forward and backward: 0.13 vs 0.83 ms for 64 x 48 x 7 x 7 -> 4 x 4 on 2 CPU cores.
        pooled = x.reshape(n * c, h * w) @ _pooling_matrix_2d(h, w, tuple(size), x.dtype, x.device)
        return pooled.view(n, c, size[0], size[1])
    rows = _pooling_matrix(h, size[0], x.dtype, x.device)
    cols = _pooling_matrix(w, size[1], x.dtype, x.device)
    # Two large GEMMs (all images and channels at once) instead of a batch of small ones.
    narrow = (x.reshape(-1, w) @ cols.T).reshape(n, c, h, size[1])
    short = narrow.transpose(2, 3).reshape(-1, h) @ rows.T
    return short.reshape(n, c, size[1], size[0]).transpose(2, 3).contiguous()


SMALL_MAP_PRODUCT = 16384     # input positions x output positions up to which pool_to uses the 2-d matrix


@functools.lru_cache(maxsize=64)
def _pooling_matrix_2d(h: int, w: int, size: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(h w) x (H W): column (i, j) averages the bin of output position (i, j), rows then columns."""
    rows, cols = _pooling_matrix(h, size[0], dtype, device), _pooling_matrix(w, size[1], dtype, device)
    return torch.kron(rows, cols).T.contiguous()


@functools.lru_cache(maxsize=64)
def _pooling_matrix(source: int, target: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """target x source: row i averages the bin [floor(i s / t), ceil((i + 1) s / t)) as adaptive pooling does."""
    matrix = torch.zeros(target, source, dtype=torch.float64)
    for i in range(target):
        start, end = (i * source) // target, -((-(i + 1) * source) // target)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix.to(device=device, dtype=dtype)


@dataclass(frozen=True)
class PairSpec:
    """One resolved (teacher layer, student layer) pair with the shapes seen at the models' input sizes."""

    teacher: str
    student: str
    teacher_channels: int          # d
    student_channels: int          # k
    teacher_size: tuple[int, int]
    student_size: tuple[int, int]

    @property
    def size(self) -> tuple[int, int]:
        """Where the two are compared: the smaller map (the larger one is average-pooled to it)."""
        return min(self.teacher_size, self.student_size, key=lambda s: s[0] * s[1])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "PairSpec":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


@torch.no_grad()
def map_shapes(model: nn.Module, names: Sequence[str], channels: int, size: int) -> dict[str, tuple[int, int, int]]:
    """(C, H, W) of the named modules' outputs on one dummy image at the model's own input size."""
    was_training = model.training
    model.eval()
    try:
        with tap_features(model, names) as feats:
            model(torch.zeros(1, channels, size, size, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
    missing = [n for i, n in enumerate(names) if i not in feats]
    if missing:
        raise ModelError(f"Layer(s) {', '.join(missing)} did not run in the forward pass.", "Pick layers that run.")
    maps = {n: as_map(feats[i], prefix_tokens(model)) for i, n in enumerate(names)}
    return {n: tuple(m.shape[1:]) for n, m in maps.items()}


def stage_names(model: nn.Module, channels: int, size: int) -> list[str]:
    """A model's stages, shallow to deep: timm's feature_info when the model has it, else for each spatial
    resolution the last module producing a map of that size (a container spanning several sizes is skipped)."""
    info = getattr(model, "feature_info", None)
    if info:
        return [entry["module"] for entry in (info.info if hasattr(info, "info") else info)]
    return _stages_by_resolution(model, channels, size)


@torch.no_grad()
def _stages_by_resolution(model: nn.Module, channels: int, size: int) -> list[str]:
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, n=name: sizes.__setitem__(n, _map_size(out)))
             for name, m in model.named_modules() if name]
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, channels, size, size, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    modules = dict(model.named_modules())
    maps = [n for n in sizes if _outputs_map(modules[n], n, sizes)]
    spanning = {n for n in maps if any(o.startswith(n + ".") and sizes[o] != sizes[n] for o in maps)}
    last_at: dict[tuple[int, int], str] = {}
    for name in maps:                      # hooks fire in completion order: later wins
        if name not in spanning:
            last_at[sizes[name]] = name
    return sorted(last_at.values(), key=lambda n: list(sizes).index(n))


def _map_size(out) -> tuple[int, int] | None:
    return tuple(out.shape[-2:]) if torch.is_tensor(out) and out.dim() == 4 else None


def _outputs_map(module: nn.Module, name: str, sizes: dict) -> bool:
    # Global pooling collapses the map to 1x1: not a stage.
    return sizes[name] is not None and sizes[name][0] * sizes[name][1] > 1


def auto_pairs(teacher_stages: list[str], student_stages: list[str]) -> list[tuple[str, str]]:
    """Pair by relative depth: the student's i-th of n stages meets the teacher's stage at the same fraction of
    its depth, so the deepest stages always meet (resolutions differ between the models' inputs, depth does not)."""
    n_t, n_s = len(teacher_stages), len(student_stages)
    count = min(n_t, n_s)
    chosen_students = student_stages[n_s - count:]
    return [(teacher_stages[max(round((j + 1) * n_t / count) - 1, 0)], s) for j, s in enumerate(chosen_students)]


def resolve_pairs(layers, teacher: nn.Module, student: nn.Module, teacher_input: tuple[int, int],
                  student_input: tuple[int, int], say=lambda _msg: None) -> list[PairSpec]:
    """`layers` is 'auto' or a list of {teacher, student} names. Inputs are (channels, size) of each model.
    Checks the names (listing what exists) and that k <= d (the student must fit in the teacher's subspace)."""
    if layers == "auto":
        named = auto_pairs(stage_names(teacher, *teacher_input), stage_names(student, *student_input))
    else:
        named = [(p.teacher, p.student) for p in layers]
        _check_names(teacher, [t for t, _ in named], "teacher", stage_names(teacher, *teacher_input))
        _check_names(student, [s for _, s in named], "student", stage_names(student, *student_input))
    if not named:
        raise ModelError("This distillation method needs layer pairs, but distill.layers is empty.",
                         "Set distill.layers: auto, or list pairs like [{teacher: blocks.4, student: features.3}].")
    t_shapes = map_shapes(teacher, [t for t, _ in named], *teacher_input)
    s_shapes = map_shapes(student, [s for _, s in named], *student_input)
    pairs = [PairSpec(t, s, t_shapes[t][0], s_shapes[s][0], t_shapes[t][1:], s_shapes[s][1:]) for t, s in named]
    too_wide = [p for p in pairs if p.student_channels > p.teacher_channels]
    if too_wide and layers == "auto":
        for p in too_wide:
            say(f"  layers auto: skipped {p.teacher} ({p.teacher_channels} ch) <- {p.student} "
                f"({p.student_channels} ch): the student layer is wider than the teacher's")
        pairs = [p for p in pairs if p not in too_wide]
    if too_wide and layers != "auto" or not pairs:
        listed = "; ".join(f"{p.student} has k={p.student_channels} > d={p.teacher_channels} of {p.teacher}"
                           for p in too_wide)
        raise ModelError(f"Layer pairs need k <= d (student channels within the teacher's): {listed}.",
                         "Pair each student layer with a teacher layer that has at least as many channels.")
    return pairs


def check_layer_names(teacher: nn.Module, student: nn.Module, layers) -> None:
    """The module names of explicit distill.layers pairs exist in the two models: names only, no forward pass, so
    that `edgesmith check` can tell before any training (the shapes are checked when the pairs are resolved)."""
    for model, role, names in ((teacher, "teacher", [p.teacher for p in layers]),
                               (student, "student", [p.student for p in layers])):
        valid = [n for n, _ in model.named_modules() if n]
        for name in names:
            if name not in valid:
                outer = [n for n in valid if n.count(".") <= 1]
                shown = ", ".join(outer[:40]) + (", ..." if len(outer) > 40 else "")
                raise ModelError(f"distill.layers: the {role} has no module named '{name}'.{did_you_mean(name, valid)}",
                                 f"Its modules include {shown} (print the model for all of them); or set "
                                 "distill.layers: auto.")


def _check_names(model: nn.Module, names: list[str], role: str, stages: list[str]) -> None:
    valid = [n for n, _ in model.named_modules() if n]
    for name in names:
        if name not in valid:
            raise ModelError(
                f"The {role} has no module named '{name}'.{did_you_mean(name, valid)}",
                f"Its stages are: {', '.join(stages)} (any module name works, e.g. print the model). "
                "Or set distill.layers: auto.")
