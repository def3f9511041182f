"""Stage `subspaces`: for each (teacher layer, student layer) pair, the teacher's relevant subspace U_k, mean mu
and normaliser alpha (SubDistill step A). Only in the chain when the distillation method needs it."""

from __future__ import annotations

import time

import torch

from .. import distributed
from ..data.for_config import subtask_data
from ..data.views import as_tensor, batches
from ..distill.methods import METHODS
from ..distill.subspace import Elsewhere, Subspace, accumulate, load_subspaces, save_subspaces
from ..distill.targets import compute_targets, save_targets
from ..distill.train import Models, layer_pairs, load_models
from ..seeds import seed_for
from ..stage import Stage, StageContext


class SubspacesStage(Stage):
    name = "subspaces"
    sections = ("subspaces", "student", "subtask", "data", "build")
    packages = ("torch", "timm")
    distributed = True        # under torchrun the teacher batches are dealt out, the float64 sums all-reduced

    def key_sections(self, cfg) -> dict:
        # Of the distill section only what the subspaces and targets depend on: changing the training settings
        # (epochs, lambda, lr, ...) reuses them.
        return {**super().key_sections(cfg), "distill.layers": _dump_layers(cfg.distill.layers)}

    def enabled(self, cfg) -> bool:
        return METHODS.get(cfg.distill.method).needs_subspaces

    def inputs(self, cfg):
        return ("adapt",)

    def run(self, ctx: StageContext) -> dict:
        cfg = ctx.config
        data = subtask_data(cfg)
        models = load_models(ctx.config, ctx.inputs["adapt"].dir, data)
        pairs = layer_pairs(cfg.distill.layers, models, ctx.log)
        images = self.choose_images(data.transfer.images, cfg.subspaces.max_images, seed_for(cfg, "subspaces.images"))
        start = time.perf_counter()
        moments = self.accumulate(ctx, models, pairs, images)
        subspaces = [Subspace.from_moments(m, p.student_channels, "subdistill", seed=0) for m, p in zip(moments, pairs)]
        seconds = time.perf_counter() - start
        save_subspaces(ctx.out, pairs, subspaces, {"basis": "subdistill", "images": len(images),
                                                   "positions_per_image": cfg.subspaces.positions_per_image})
        return {**self.measure(pairs, subspaces, len(images), seconds), **self.cache_targets(ctx, models, pairs, data)}

    def cache_targets(self, ctx: StageContext, models: Models, pairs, data) -> dict:
        """The projected layer targets and logits of the frozen teacher on the whole transfer set, once, so that
        distill never runs the teacher (pipeline.distill.targets). Not when the images change every epoch."""
        cfg = ctx.config
        if cfg.data.augment:
            return {}
        _, layers = load_subspaces(ctx.out)
        images = data.transfer.images
        start = time.perf_counter()
        with ctx.progress.task("subspaces (projected teacher targets)", len(images)) as bar:
            logits, targets = compute_targets(models.teacher, models.teacher_view, images, pairs, layers,
                                              models.teacher_ids, ctx.device, on_batch=bar.advance)
        size = save_targets(ctx.out, images, logits, targets)
        return {"targets_images": len(images), "targets_s": round(time.perf_counter() - start, 2),
                "targets_mib": round(size / 2**20, 1), "targets_dtype": "float16"}

    def choose_images(self, images, cap: int | None, seed: int) -> torch.Tensor:
        """A seeded subset (kept in dataset order) when the training split is larger than the cap."""
        source = as_tensor(images)
        if cap is None or cap >= len(source):
            return source
        keep = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))[:cap]
        return source[keep.sort().values]

    def accumulate(self, ctx: StageContext, models: Models, pairs, images: torch.Tensor):
        cfg = ctx.config.subspaces
        teacher = models.teacher.to(ctx.device)
        normalised = (models.teacher_view(images[idx].to(ctx.device)) if distributed.owns(number) else Elsewhere(len(idx))
                      for number, idx in enumerate(batches(len(images), cfg.batch_size)))
        with ctx.progress.task("subspaces (teacher margin gradients)", len(images)) as bar:
            return accumulate(teacher, normalised, pairs, models.teacher_ids, cfg.positions_per_image,
                              seed_for(ctx.config, "subspaces.positions"), on_batch=bar.advance)

    def measure(self, pairs, subspaces, images: int, seconds: float) -> dict:
        return {
            "estimation_s": round(seconds, 2), "images": images,
            "pairs": [f"{p.teacher}<-{p.student}" for p in pairs],
            "layers": [{"teacher": p.teacher, "student": p.student, "d": p.teacher_channels, "k": p.student_channels,
                        "compared_at": list(p.size), "alpha": s.alpha,
                        "energy_fraction_in_subspace": round(s.spectrum["energy_fraction_in_subspace"], 4)}
                       for p, s in zip(pairs, subspaces)],
        }


def _dump_layers(layers):
    return layers if isinstance(layers, str) else [pair.model_dump(mode="json") for pair in layers]
