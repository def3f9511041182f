"""Quantization-aware fine-tuning: train the fake-quantized student against the teacher, keep the best epoch."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from pipeline import distributed
from pipeline.data import View, batches
from pipeline.data.views import as_tensor

# (student logits, teacher subtask logits, labels) -> scalar loss
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def distillation_loss(distill_cfg) -> LossFn:
    """The logit terms of the distill stage's method (KD at its temperature, plus its label weight).
    Layer terms are left out: QAT only nudges a student that already learned the teacher's features."""
    from pipeline.distill.methods import METHODS, DistillMethod, Outputs

    method_cls = METHODS.get(distill_cfg.method)
    method = DistillMethod(distill_cfg) if method_cls.uses_layers else method_cls(distill_cfg)

    def loss(student_logits, teacher_logits, labels):
        return method(Outputs(student_logits, teacher_logits, labels))["total"]

    return loss


@dataclass(frozen=True)
class TrainSet:
    images: np.ndarray               # uint8 N x C x H x W
    labels: np.ndarray               # int64 N
    teacher_logits: torch.Tensor     # N x k, computed once (the teacher is frozen, no augmentation)


@torch.no_grad()
def model_accuracy(model: nn.Module, view: View, images: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> float:
    """Top-1 accuracy; under torchrun each process predicts a share (with rank 0's buffers) and the hits add up."""
    model.eval()
    total = len(images)
    if distributed.active():
        distributed.broadcast_buffers(model)
        rows = distributed.row_range(total)
        images, labels = images[rows], labels[rows]
    source, correct = as_tensor(images), 0
    for idx in batches(len(source), batch_size):
        correct += int((model(view(source[idx])).argmax(1) == torch.as_tensor(labels[idx.numpy()])).sum())
    correct = int(distributed.all_reduce_floats({"hits": correct})["hits"]) if distributed.active() else correct
    return correct / max(total, 1)


def finetune(model: nn.Module, view: View, train: TrainSet, evaluate: Callable[[nn.Module], float],
             loss_fn: LossFn, epochs: int, lr: float, batch_size: int, seed: int = 0,
             max_images: int | None = None, on_step: Callable[[int, float], None] | None = None,
             micro_batch: int | None = None) -> list[float]:
    """Fine-tune in place; returns validation accuracy before training and after each epoch. The model ends
    with the weights of the best of those (the calibrated start counts: QAT may never make things worse).
    Under torchrun: the same global batches on every process, each training on its share (DDP, on the CPU
    like the single-process loop); `micro_batch` caps the images per forward pass (gradients accumulate)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    trained = distributed.wrap_ddp(model, torch.device("cpu"))
    history = [evaluate(model)]
    best_state, best = copy.deepcopy(model.state_dict()), history[0]
    images = as_tensor(train.images)
    labels = torch.as_tensor(train.labels)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(images), generator=generator)[:max_images]
        for idx in batches(len(order), batch_size):
            idx = order[idx]
            optimizer.zero_grad(set_to_none=True)
            chunks = distributed.local_chunks(idx, micro_batch)
            for j, (part, weight) in enumerate(chunks):
                with distributed.sync_unless_last(trained, j == len(chunks) - 1):
                    loss = loss_fn(trained(view(images[part])), train.teacher_logits[part], labels[part])
                    (loss if weight == 1.0 else loss * weight).backward()
            optimizer.step()
            if on_step:
                on_step(len(idx), loss.item())
        history.append(evaluate(model))
        if history[-1] > best:
            best_state, best = copy.deepcopy(model.state_dict()), history[-1]
    model.load_state_dict(best_state)
    return history
