"""Split a network into a frozen prefix and a trainable tail, so the prefix's output can be computed once."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelError

EXPANDABLE = (nn.Sequential, nn.ModuleList)


def sequential_parts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Top-level children in order, with Sequential containers (timm `blocks`, `features`) opened one level."""
    parts = []
    for name, child in model.named_children():
        if isinstance(child, EXPANDABLE) and name not in ("head",):
            parts += [(f"{name}.{sub}", grandchild) for sub, grandchild in child.named_children()]
        else:
            parts.append((name, child))
    return parts


def split_at(model: nn.Module, first_trainable: str, example: torch.Tensor) -> tuple[nn.Sequential, nn.Sequential]:
    parts = sequential_parts(model)
    names = [n for n, _ in parts]
    if first_trainable not in names:
        raise ModelError(f"teacher.adapt.train_from '{first_trainable}' is not a top-level stage of the teacher.",
                         f"Use one of: {', '.join(names)}.")
    cut = names.index(first_trainable)
    prefix = nn.Sequential(*[m for _, m in parts[:cut]])
    tail = nn.Sequential(*[m for _, m in parts[cut:]])
    _check_equivalent(model, prefix, tail, example)
    return prefix, tail


@torch.no_grad()
def _check_equivalent(model: nn.Module, prefix: nn.Module, tail: nn.Module, example: torch.Tensor) -> None:
    # Only architectures whose forward is the plain chain of their children can be split this way.
    was_training = model.training
    model.eval()
    try:
        reference = model(example)
        composed = tail(prefix(example))
        ok = composed.shape == reference.shape and torch.allclose(composed, reference, atol=1e-4, rtol=1e-3)
    except Exception:  # noqa: BLE001 - any failure means the chain is not the forward
        ok = False
    finally:
        model.train(was_training)
    if not ok:
        raise ModelError("This teacher's forward is not a plain chain of its modules, so it cannot be split for "
                         "cached fine-tuning.", "Set teacher.adapt.train_from: null to fine-tune the whole network.")
