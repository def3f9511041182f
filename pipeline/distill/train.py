"""The distillation loop: frozen teacher, trainable student (+ the method's own parts), best-on-validation."""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from ..data import View
from ..data.views import as_tensor, augment_batch, batches
from ..stages.common import accuracy, predict_logits
from .features import PairSpec, resolve_pairs, tap_features
from .methods import DistillMethod, Outputs


@dataclass
class Models:
    teacher: nn.Module
    student: nn.Module
    teacher_view: View
    student_view: View
    teacher_ids: list[int]          # the subtask's columns in the teacher's head


def layer_pairs(layers, models: Models, say=lambda _msg: None) -> list[PairSpec]:
    """distill.layers ('auto' or names) resolved against the two models at their own input sizes."""
    tv, sv = models.teacher_view, models.student_view
    return resolve_pairs(layers, models.teacher, models.student, (tv.channels, tv.size), (sv.channels, sv.size), say)


class TeacherOutputs:
    """Teacher subtask logits and layer targets per training image: computed once when the inputs are fixed
    (no augmentation), else on the fly without autograd. `precomputed` (logits, {pair: teacher map}) for every
    training image skips the teacher entirely: several methods or seeds can share one teacher pass."""

    def __init__(self, models: Models, method: DistillMethod, images: torch.Tensor, device, cached: bool,
                 progress=None, precomputed: tuple[torch.Tensor, dict[int, torch.Tensor]] | None = None):
        self.models, self.method, self.device = models, method, device
        self.teacher_layers = [p.teacher for p in method.pairs]
        self.cached = None
        if precomputed is not None:
            self.cached = self._targets_of(*precomputed)
        elif cached:
            self.cached = self._compute_all(images, progress)

    @torch.no_grad()
    def _targets_of(self, logits: torch.Tensor, maps: dict[int, torch.Tensor], batch: int = 1024):
        targets = {i: torch.cat([self.method.teacher_target(i, maps[i][j:j + batch].to(self.device)).cpu()
                                 for j in range(0, len(logits), batch)]) for i in range(len(self.teacher_layers))}
        return logits, targets

    @torch.no_grad()  # not inference_mode: cached targets enter losses that autograd records
    def compute(self, raw: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        teacher = self.models.teacher
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.device.type == "cuda" else nullcontext()
        with tap_features(teacher, self.teacher_layers) as feats, autocast:
            x = self.models.teacher_view(raw.to(self.device))
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            logits = teacher(x)[:, self.models.teacher_ids].float()
        targets = {i: self.method.teacher_target(i, f.float()) for i, f in feats.items()}
        return logits, targets

    def _compute_all(self, images: torch.Tensor, progress) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        logits, targets = [], {i: [] for i in range(len(self.teacher_layers))}
        batch = 256
        with (progress.task("teacher outputs (cached)", (len(images) + batch - 1) // batch)
              if progress else nullcontext()) as bar:
            for idx in batches(len(images), batch):
                lg, tg = self.compute(images[idx])
                logits.append(lg.cpu())
                for i, t in tg.items():
                    targets[i].append(t.cpu())
                if bar:
                    bar.advance(1)
        return torch.cat(logits), {i: torch.cat(t) for i, t in targets.items()}

    def for_batch(self, idx: torch.Tensor, raw: torch.Tensor):
        if self.cached is None:
            return self.compute(raw)
        logits, targets = self.cached
        return logits[idx].to(self.device), {i: t[idx].to(self.device) for i, t in targets.items()}


def distill(models: Models, method: DistillMethod, train, val, cfg, seed: int, augment: bool, device,
            progress, precomputed: tuple[torch.Tensor, dict[int, torch.Tensor]] | None = None,
            outliers=None) -> dict:
    """Train the student; returns history and the best epoch, and leaves the best weights in the student.
    `outliers` (pipeline.ood.exposure.OutlierExposure) adds an outlier-exposure loss to every step."""
    student, teacher = models.student.to(device), models.teacher.to(device)
    method.to(device)
    images, labels = as_tensor(train.images), torch.as_tensor(train.labels)
    teacher_out = TeacherOutputs(models, method, images, device, cached=cfg.cache_teacher and not augment,
                                 progress=progress, precomputed=None if augment else precomputed)
    params = list(student.parameters()) + list(method.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step_epochs, gamma=cfg.lr_gamma)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.amp)
    generator = torch.Generator().manual_seed(seed + 2)
    student_layers = [p.student for p in method.pairs]
    best = {"val_acc": -1.0, "epoch": 0, "state": None}
    history, images_seen, train_time = [], 0, 0.0
    with progress.task(f"distill ({cfg.method})", cfg.epochs) as bar:
        for epoch in range(1, cfg.epochs + 1):
            # Every epoch: student (and method parts) train, teacher eval -- a student left in eval mode would
            # never update its BatchNorm statistics.
            student.train(), method.train(), teacher.eval()
            sums: dict[str, float] = {}
            start = time.perf_counter()
            for idx in batches(len(images), cfg.batch_size, shuffle=True, generator=generator):
                raw = augment_batch(images[idx], generator) if augment else images[idx]
                t_logits, t_targets = teacher_out.for_batch(idx, raw)
                autocast = torch.autocast("cuda", dtype=torch.float16) if scaler.is_enabled() else nullcontext()
                with tap_features(student, student_layers) as s_feats, autocast:
                    s_logits = student(models.student_view(raw.to(device)))
                    losses = method(Outputs(s_logits.float(), t_logits, labels[idx].to(device),
                                            {i: f.float() for i, f in s_feats.items()}, t_targets))
                if outliers is not None:  # its own forward pass, outside tap_features: layer losses stay in-subtask
                    losses = outliers(losses, student)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(losses["total"]).backward()
                scaler.step(optimizer)
                scaler.update()
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0.0) + float(value.detach() if torch.is_tensor(value) else value) * len(idx)
                images_seen += len(idx)
            train_time += time.perf_counter() - start
            schedule.step()
            val_acc = accuracy(predict_logits(student, models.student_view, val.images, device), val.labels)
            epoch_losses = {k: v / len(images) for k, v in sums.items()}
            history.append({"epoch": epoch, "val_acc": val_acc, **epoch_losses})
            if val_acc > best["val_acc"]:
                best = {"val_acc": val_acc, "epoch": epoch, "state": copy.deepcopy(student.state_dict())}
            bar.advance(1, loss=epoch_losses["total"], val_acc=val_acc)
            progress.log(f"  distill epoch {epoch}/{cfg.epochs}: " +
                         " ".join(f"{k} {v:.4f}" for k, v in epoch_losses.items()) + f"  val acc {val_acc:.4f}")
    student.load_state_dict(best["state"])
    student.eval()
    return {"best_val_acc": best["val_acc"], "best_epoch": best["epoch"], "history": history,
            "train_images_per_s": images_seen / max(train_time, 1e-9)}
