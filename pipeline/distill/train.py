"""The distillation loop: frozen teacher, trainable student (+ the method's own parts), best-on-validation."""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..data import View
from ..data.views import as_tensor, augment_batch, batches
from ..models.layout import channels_last
from ..models.predict import accuracy, predict_logits
from .features import PairSpec, resolve_pairs, tap_features
from .methods import DistillMethod, Outputs


@dataclass
class Models:
    teacher: nn.Module
    student: nn.Module
    teacher_view: View
    student_view: View
    teacher_ids: list[int]          # the subtask's columns in the teacher's head


def student_view(cfg, dataset) -> View:
    """The student takes the device's native input unless student.input says otherwise."""
    return View.resolve(cfg.student.input, default_size=dataset.size, default_channels=dataset.channels)


def load_models(cfg, adapt_dir, data) -> Models:
    """The frozen adapted teacher (from the adapt stage's folder) and a fresh student for the subtask."""
    from ..models import create_model, load_teacher
    from ..models.adapt import teacher_class_ids

    teacher, spec = load_teacher(adapt_dir)
    for p in teacher.parameters():
        p.requires_grad_(False)
    view = student_view(cfg, data.dataset)
    student = create_model(cfg.student.arch, data.num_classes, view.channels, cfg.student.pretrained)
    return Models(teacher, student, spec.input, view, teacher_class_ids(spec.class_names, data))


def layer_pairs(layers, models: Models, say=lambda _msg: None) -> list[PairSpec]:
    """distill.layers ('auto' or names) resolved against the two models at their own input sizes."""
    tv, sv = models.teacher_view, models.student_view
    return resolve_pairs(layers, models.teacher, models.student, (tv.channels, tv.size), (sv.channels, sv.size), say)


def mixed_precision(device: torch.device, amp: bool):
    """float16 autocast where distill.amp asks for it and the device is a GPU; full precision otherwise (the CPU
    ignores distill.amp)."""
    return torch.autocast("cuda", dtype=torch.float16) if amp and device.type == "cuda" else nullcontext()


class TeacherOutputs:
    """Teacher subtask logits and layer targets per training image: computed once when the inputs are fixed
    (no augmentation), else on the fly without autograd. `precomputed` (logits, {pair: teacher map}) for every
    training image skips the teacher entirely: several methods or seeds can share one teacher pass. `known_logits`
    (the adapt stage's table, with several heads their mean) are the cached logits: a method without layer targets
    then never runs the teacher; one with them runs the network (the first head) for those only."""

    def __init__(self, models: Models, method: DistillMethod, images: torch.Tensor, device, cached: bool,
                 progress=None, precomputed: tuple[torch.Tensor, dict[int, torch.Tensor]] | None = None,
                 projected: tuple[torch.Tensor, dict[int, torch.Tensor]] | None = None, amp: bool = False,
                 known_logits: torch.Tensor | None = None):
        self.models, self.method, self.device, self.amp = models, method, device, amp
        self.teacher_layers = [p.teacher for p in method.pairs]
        self.cached, self.projected = None, projected is not None
        if projected is not None:      # SubDistill's targets from the subspaces stage (pipeline.distill.targets)
            from .targets import TargetStore

            self.cached = projected[0], TargetStore(projected[1], method.from_projection)
        elif precomputed is not None:
            self.cached = self._targets_of(*precomputed)
        elif cached and known_logits is not None and not self.teacher_layers:
            self.cached = known_logits, {}
        elif cached:
            self.cached = self._compute_all(images, progress)
        if known_logits is not None and self.cached is not None:
            self.cached = known_logits, self.cached[1]

    @torch.no_grad()
    def _targets_of(self, logits: torch.Tensor, maps: dict[int, torch.Tensor], batch: int = 1024):
        targets = {i: torch.cat([self.method.teacher_target(i, maps[i][j:j + batch].to(self.device)).cpu()
                                 for j in range(0, len(logits), batch)]) for i in range(len(self.teacher_layers))}
        return logits, targets

    @torch.no_grad()  # not inference_mode: cached targets enter losses that autograd records
    def compute(self, raw: torch.Tensor, layers: bool = True) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        teacher = self.models.teacher
        with tap_features(teacher, self.teacher_layers if layers else []) as feats, mixed_precision(self.device, self.amp):
            x = channels_last(self.models.teacher_view(raw.to(self.device)))
            logits = teacher(x)[:, self.models.teacher_ids].float()
        targets = {i: self.method.teacher_target(i, f.float()) for i, f in feats.items()}
        return logits, targets

    def _compute_all(self, images: torch.Tensor, progress) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        # Several processes: each runs the teacher on its share of the images and all of them gather the whole
        # cache, indexed like `images` (a batch's rows are looked up by their global index on every process).
        total, images = len(images), images[distributed.row_range(len(images))]
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
        gather = lambda parts: distributed.all_gather_rows(torch.cat(parts), total)  # noqa: E731
        return gather(logits), {i: gather(t) for i, t in targets.items()}

    def for_batch(self, idx: torch.Tensor, raw: torch.Tensor, layers: bool = True):
        """The batch's teacher logits and, if `layers`, its layer targets (else {})."""
        if self.cached is None:
            return self.compute(raw, layers)
        logits, targets = self.cached
        if not layers:
            return logits[idx].to(self.device), {}
        if self.projected:
            return logits[idx].to(self.device), targets.batch(idx, self.device)
        return logits[idx].to(self.device), {i: t[idx].to(self.device) for i, t in targets.items()}


class TrainStep(nn.Module):
    """The student and the method's trainable parts (orthogonal V matrices, projection heads) as one module, so
    that DistributedDataParallel all-reduces the gradients of both. Returns the method's named losses."""

    def __init__(self, models: Models, method: DistillMethod, outliers=None):
        super().__init__()
        self.student, self.method, self.view = models.student, method, models.student_view
        self.layers = [p.student for p in method.pairs]
        self.outliers = outliers

    def forward(self, raw: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor,
                t_targets: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
        with tap_features(self.student, self.layers if self.method.layers_now else []) as s_feats:
            s_logits = self.student(self.view(raw))
            losses = self.method(Outputs(s_logits.float(), t_logits, labels,
                                         {i: f.float() for i, f in s_feats.items()}, t_targets))
        if self.outliers is not None:  # its own forward pass, outside tap_features: layer losses stay in-subtask
            losses = self.outliers(losses, self.student)
        return losses


def split_accuracy(model: nn.Module, view: View, split, device) -> float:
    """Accuracy on an image set; several processes each predict a share and add up the hits."""
    if not distributed.active():
        return accuracy(predict_logits(model, view, split.images, device), split.labels)
    distributed.broadcast_buffers(model)          # every process evaluates with rank 0's BatchNorm statistics
    rows = distributed.row_range(len(split.labels))
    logits = predict_logits(model, view, split.images[rows], device)
    hits = float((logits.argmax(1) == torch.as_tensor(split.labels[rows])).sum())
    correct = distributed.all_reduce_floats({"hits": hits})["hits"]
    return float(torch.tensor(correct, dtype=torch.float32) / len(split.labels))   # as accuracy() computes it


@dataclass(frozen=True)
class DistillSettings:
    """How one distillation run trains, besides the models, the method and the images.

    `precomputed`: the teacher's outputs on every training image, computed elsewhere (a benchmark's shared teacher
    pass); `projected`: SubDistill's targets as the subspaces stage cached them; `known_logits`: the teacher's
    logits on every training image from the adapt stage's table.
    Under torchrun every process draws the same global batches and trains on its share of each (DDP);
    `micro_batch` caps the images per forward pass (gradients accumulate up to the global batch).
    `outliers` (pipeline.ood.exposure.OutlierExposure) adds an outlier-exposure loss to every step."""

    cfg: Any                            # the distill section (pipeline.distill.config.DistillConfig)
    seed: int
    device: torch.device
    progress: Any                       # pipeline.progress.ProgressDisplay
    augment: bool = False
    micro_batch: int | None = None
    precomputed: tuple[torch.Tensor, dict[int, torch.Tensor]] | None = None
    projected: tuple[torch.Tensor, dict[int, torch.Tensor]] | None = None
    known_logits: torch.Tensor | None = None
    outliers: Any = None
    on_epoch: Any = None                # called with (epoch, validation accuracy) after every epoch; may raise to stop


@dataclass
class LoopParts:
    """What the training loop steps with: built once per distillation."""

    step: nn.Module               # TrainStep, DDP-wrapped under torchrun
    teacher_out: TeacherOutputs
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    images: torch.Tensor
    labels: torch.Tensor


def loop_parts(models: Models, method: DistillMethod, train, settings: DistillSettings) -> LoopParts:
    cfg, augment, device = settings.cfg, settings.augment, settings.device
    student = models.student.to(device)
    # The frozen teacher runs in channels_last (about 2x faster for convolution networks, on CPU as on CUDA).
    models.teacher.to(device).to(memory_format=torch.channels_last)
    method.to(device)
    # A lazy layer loss leaves the method's own parameters without a gradient on the steps between.
    step = distributed.wrap_ddp(TrainStep(models, method, settings.outliers).to(device), device,
                                find_unused_parameters=method.layer_every > 1)
    images, labels = as_tensor(train.images), torch.as_tensor(train.labels)
    fixed = not augment          # the teacher sees a fixed set of inputs: its outputs are computed once
    teacher_out = TeacherOutputs(models, method, images, device, cached=fixed, progress=settings.progress,
                                 precomputed=settings.precomputed if fixed else None,
                                 projected=settings.projected if fixed else None, amp=cfg.amp,
                                 known_logits=settings.known_logits if fixed else None)
    params = list(student.parameters()) + list(method.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # The scaler is on exactly when the steps run under mixed_precision (float16 gradients need loss scaling).
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.amp)
    return LoopParts(step, teacher_out, optimizer, scaler, images, labels)


def optimizer_step(parts: LoopParts, method: DistillMethod, rows: torch.Tensor, raw: torch.Tensor, labels: torch.Tensor,
                   device, micro_batch: int | None = None) -> list[tuple[dict[str, torch.Tensor], int]]:
    """One optimizer step on a global batch: `raw` images (`rows` of the teacher's cache, their `labels`), this
    process's share of it in micro-batches, gradients accumulated, then the update and the method's after_step.
    Returns each micro-batch's losses with the number of images they count for (0 for padding)."""
    parts.optimizer.zero_grad(set_to_none=True)
    layers = method.begin_step()
    chunks = distributed.local_chunks(torch.arange(len(rows)), micro_batch)
    done = []
    for j, (pos, weight) in enumerate(chunks):
        losses = _accumulate(parts.step, parts.teacher_out, rows[pos], raw[pos], labels[pos], weight, parts.scaler,
                             device, last=j == len(chunks) - 1, layers=layers)
        done.append((losses, len(pos) * (weight > 0)))
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    method.after_step()
    return done


def weight_average(student: nn.Module, decay: float | None):
    """An exponential moving average of the student's weights and BatchNorm statistics (distill.ema_decay), updated
    after every optimizer step and started from the initial weights; None without one."""
    if decay is None:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    average = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    average.update_parameters(student)          # the first update copies: the average starts where the student does
    return average


def distill(models: Models, method: DistillMethod, train, val, settings: DistillSettings) -> dict:
    """Train the student; returns history and the best epoch, and leaves the best weights in the student."""
    cfg, seed, augment, device, progress = settings.cfg, settings.seed, settings.augment, settings.device, settings.progress
    micro_batch = settings.micro_batch
    student, teacher = models.student, models.teacher
    parts = loop_parts(models, method, train, settings)
    images, labels = parts.images, parts.labels
    schedule = torch.optim.lr_scheduler.StepLR(parts.optimizer, step_size=cfg.lr_step_epochs, gamma=cfg.lr_gamma)
    generator = torch.Generator().manual_seed(seed)        # settings.seed: the build's distill.batches stream
    average = weight_average(student, cfg.ema_decay)
    scored = average.module if average is not None else student     # what validation sees
    best = {"val_acc": -1.0, "epoch": 0, "state": None}
    history, images_seen, train_time = [], 0, 0.0
    with progress.task(f"distill ({cfg.method})", cfg.epochs) as bar:
        for epoch in range(1, cfg.epochs + 1):
            # Every epoch: student (and method parts) train, teacher eval -- a student left in eval mode would
            # never update its BatchNorm statistics.
            student.train(), method.train(), teacher.eval()
            sums: dict[str, float] = {}
            counts: dict[str, float] = {}       # images each loss was computed on (a lazy layer loss: fewer)
            start = time.perf_counter()
            for idx in batches(len(images), cfg.batch_size, shuffle=True, generator=generator):
                distributed.fault_point("distill")
                # The whole global batch is drawn (and augmented) on every process, which keeps the generator in
                # step; each process then trains on its share, in micro-batches.
                raw = augment_batch(images[idx], generator) if augment else images[idx]
                for losses, count in optimizer_step(parts, method, idx, raw, labels[idx], device, micro_batch):
                    for name, value in losses.items():
                        sums[name] = sums.get(name, 0.0) + float(value.detach() if torch.is_tensor(value) else value) * count
                        counts[name] = counts.get(name, 0.0) + count
                if average is not None:
                    average.update_parameters(student)
                images_seen += len(idx)
            train_time += time.perf_counter() - start
            schedule.step()
            val_acc = split_accuracy(scored, models.student_view, val, device)
            sums, counts = distributed.all_reduce_floats(sums), distributed.all_reduce_floats(counts)
            epoch_losses = {k: v / counts[k] for k, v in sums.items()}
            history.append({"epoch": epoch, "val_acc": val_acc, **epoch_losses})
            if average is None and val_acc > best["val_acc"]:
                best = {"val_acc": val_acc, "epoch": epoch, "state": copy.deepcopy(student.state_dict())}
            bar.advance(1, loss=epoch_losses["total"], val_acc=val_acc)
            progress.log(f"  distill epoch {epoch}/{cfg.epochs}: " +
                         " ".join(f"{k} {v:.4f}" for k, v in epoch_losses.items()) + f"  val acc {val_acc:.4f}")
            if settings.on_epoch is not None:
                settings.on_epoch(epoch, val_acc)
    if average is not None:     # the last epoch's average: no pick among epochs by a few validation images
        best = {"val_acc": val_acc, "epoch": cfg.epochs, "state": average.module.state_dict()}
    student.load_state_dict(best["state"])
    student.eval()
    teacher.to(memory_format=torch.contiguous_format)
    return {"best_val_acc": best["val_acc"], "best_epoch": best["epoch"], "history": history,
            "train_images_per_s": images_seen / max(train_time, 1e-9), "amp": parts.scaler.is_enabled()}


def _accumulate(step: nn.Module, teacher_out: TeacherOutputs, rows: torch.Tensor, raw: torch.Tensor, labels, weight: float,
                scaler, device, last: bool, layers: bool = True) -> dict[str, torch.Tensor]:
    """Forward and backward of one micro-batch (`rows` of the teacher's cache, `labels` of its images); DDP
    all-reduces the gradients at the last one. `layers`: whether this step has the layer loss (its targets)."""
    t_logits, t_targets = teacher_out.for_batch(rows, raw, layers)
    with distributed.sync_unless_last(step, last):
        with mixed_precision(device, scaler.is_enabled()):
            losses = step(raw.to(device), t_logits, labels.to(device), t_targets)
        total = losses["total"] if weight == 1.0 else losses["total"] * weight
        scaler.scale(total).backward()
    return losses
