"""A plain supervised training loop with best-on-validation (or last-epoch) selection (teacher training and
adaptation)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..data.views import batches


@dataclass(frozen=True)
class FitSettings:
    epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    seed: int
    keep_last: bool = False   # keep the last epoch's weights instead of the best on validation


def fit_classifier(module: nn.Module, n_train: int, train_batch: Callable[[torch.Tensor], tuple],
                   validate: Callable[[], float], settings: FitSettings, progress, description: str) -> dict:
    """Cross-entropy training; keeps the weights of the epoch with the best validation accuracy (or, with
    settings.keep_last, of the last epoch: the one-cycle schedule ends at a small learning rate)."""
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    steps = settings.epochs * ((n_train + settings.batch_size - 1) // settings.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=max(steps, 1),
                                                   pct_start=0.15)
    generator = torch.Generator().manual_seed(settings.seed)
    best = {"val_acc": -1.0, "epoch": 0, "state": None}
    history = []
    with progress.task(description, settings.epochs) as bar:
        for epoch in range(1, settings.epochs + 1):
            module.train()
            total, count = 0.0, 0
            for idx in batches(n_train, settings.batch_size, shuffle=True, generator=generator):
                inputs, labels = train_batch(idx)
                loss = F.cross_entropy(module(inputs), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total, count = total + loss.item() * len(idx), count + len(idx)
            val_acc = validate()
            history.append({"epoch": epoch, "loss": total / max(count, 1), "val_acc": val_acc})
            if val_acc > best["val_acc"] or settings.keep_last:     # keep_last: the weights stay where they end
                best = {"val_acc": val_acc, "epoch": epoch,
                        "state": None if settings.keep_last else copy.deepcopy(module.state_dict())}
            bar.advance(1, loss=total / max(count, 1), val_acc=val_acc)
            progress.log(f"  {description} epoch {epoch}/{settings.epochs}: loss {total / max(count, 1):.4f} "
                         f"val acc {val_acc:.4f}")
    if best["state"] is not None:
        module.load_state_dict(best["state"])
    return {"best_val_acc": best["val_acc"], "best_epoch": best["epoch"], "history": history}
