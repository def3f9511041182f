"""Stage `distill`: train the small student on the subtask from the frozen, adapted teacher."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..config import EdgesmithConfig, config_with
from ..data.for_config import subtask_data
from ..distill.methods import METHODS
from ..distill.train import DistillSettings, Models, distill, layer_pairs, load_models
from ..models import StudentSpec, count_macs, count_params, save_model
from ..models.known_logits import KnownLogits, teacher_logits
from ..models.predict import accuracy, predict_logits
from ..ood.exposure import outlier_exposure
from ..search.space import Candidate
from ..seeds import seed_for
from ..stage import Stage, StageContext

CHOSEN = "chosen.json"


def candidate_config(cfg: EdgesmithConfig, candidate: Candidate, epochs: int | None = None) -> EdgesmithConfig:
    """The build's config with the candidate as its student (and the search section gone)."""
    overrides = {"student.arch": candidate.arch, "student.input.size": candidate.resolution}
    if epochs is not None:
        overrides["distill.epochs"] = epochs
    return config_with(cfg, overrides, remove=("search",))


def chosen_config(cfg: EdgesmithConfig, search_dir: Path) -> EdgesmithConfig:
    """What distill trains when the search picked the student."""
    chosen = json.loads((Path(search_dir) / CHOSEN).read_text())
    return candidate_config(cfg, Candidate(chosen["arch"], chosen["resolution"]))


def searched_student(search_dir: Path) -> dict:
    """What the model card says about a searched student: which, why, and how many candidates were tried."""
    chosen = json.loads((Path(search_dir) / CHOSEN).read_text())
    trials = json.loads((Path(search_dir) / "trials.json").read_text())
    return {"arch": chosen["arch"], "resolution": chosen["resolution"], "why": chosen["why"], "candidates": len(trials)}


@dataclass(frozen=True)
class DistillRun:
    """The inputs of one distillation: the subtask data, models, method, transfer set and loop settings."""

    data: Any
    models: Models
    method: Any
    train: Any
    known: Any
    settings: DistillSettings


class DistillStage(Stage):
    name = "distill"
    sections = ("distill", "student", "subtask", "data", "build")
    packages = ("torch", "timm")
    distributed = True        # under torchrun every process trains on its share of each global batch (DDP)

    def key_sections(self, cfg) -> dict:
        exposure = cfg.ood.exposure_key() if cfg.ood is not None else None
        return {**super().key_sections(cfg), **({"ood.outlier_exposure": exposure} if exposure else {})}

    def inputs(self, cfg):
        base = ("adapt", "subspaces") if METHODS.get(cfg.distill.method).needs_subspaces else ("adapt",)
        # ood.mined_outliers embeds with the teacher as it was before adaptation
        mining = cfg.ood is not None and cfg.ood.mined_outliers is not None
        return base + (("search",) if cfg.search is not None else ()) + (("teacher",) if mining else ())

    def run(self, ctx: StageContext) -> dict:
        searched = {}
        if "search" in ctx.inputs:          # the search picked the student: train that one with the full recipe
            ctx = replace(ctx, config=chosen_config(ctx.config, ctx.inputs["search"].dir))
            searched = {"search": searched_student(ctx.inputs["search"].dir)}
        run = self.prepare(ctx)
        result = distill(run.models, run.method, run.train, run.data.val, run.settings)
        self.save(ctx, run.models, run.data)
        return {**self.measure(ctx, run.models, run.data, run.known), **self.budget(run.data, run.train), **result,
                **searched}

    def prepare(self, ctx: StageContext) -> "DistillRun":
        """Everything the training loop gets, built as the stage builds it (bench/subdistill_steps.py times steps
        of it)."""
        cfg = ctx.config
        data = subtask_data(cfg)
        models = load_models(cfg, ctx.inputs["adapt"].dir, data)
        method = self.prepare_method(ctx, models)
        known = KnownLogits.load(ctx.inputs["adapt"].dir)
        original = ctx.inputs["teacher"].dir if "teacher" in ctx.inputs else None
        outliers = outlier_exposure(cfg, models, ctx.device, ctx.log, known, original)  # None unless outlier_exposure
        train = self.transfer_set(ctx, method, data, outliers)
        settings = DistillSettings(
            cfg.distill, seed_for(cfg, "distill.batches"), ctx.device, ctx.progress, augment=cfg.data.augment,
            micro_batch=cfg.distributed.micro_batch if cfg.distributed else None,
            projected=self.projected_targets(ctx, method, train),
            known_logits=self.known_logits(ctx, models, train, known), outliers=outliers)
        return DistillRun(data, models, method, train, known, settings)

    def transfer_set(self, ctx: StageContext, method, data, outliers=None):
        """Labelled images + the unlabelled pool (labels only where they exist); a method without a teacher has
        nothing to learn from the pool. Outliers mined from the pool leave it unless ood.mined_outliers.distill."""
        if not method.uses_kd or data.pool is None:
            return data.train
        mined = ctx.config.ood.mined_outliers if ctx.config.ood is not None else None
        if outliers is not None and outliers.pool_rows is not None and not mined.distill:
            keep = np.setdiff1d(np.arange(len(data.pool)), outliers.pool_rows)
            data = replace(data, pool=data.pool.take(keep))
            ctx.log(f"  transfer set: the {len(outliers.pool_rows)} mined outliers left out of the pool")
        ctx.log(f"  transfer set: {len(data.train)} labelled + {len(data.pool)} unlabelled images ({data.budget})")
        return data.transfer

    def budget(self, data, train) -> dict:
        if not data.few_labels and data.pool is None:
            return {}
        return {"labels_per_class": data.labels_per_class, "label_budget": data.budget,
                "labelled_train_images": len(data.train), "val_images": len(data.val), "transfer_images": len(train)}

    def known_logits(self, ctx: StageContext, models: Models, train, known):
        """The teacher's subtask logits on the training images, looked up in the adapt stage's table where it has
        them (with several heads, their mean), when the teacher's inputs are fixed (no augmentation)."""
        if ctx.config.data.augment or known is None:
            return None
        return teacher_logits(models.teacher, models.teacher_view, train.images, ctx.device, models.teacher_ids, known)

    def projected_targets(self, ctx: StageContext, method, train):
        """SubDistill's layer targets and the teacher's logits as the subspaces stage cached them, if it did."""
        if "subspaces" not in ctx.inputs or ctx.config.data.augment:
            return None
        from ..distill.targets import load_targets

        cached = load_targets(ctx.inputs["subspaces"].dir, train.images, len(method.pairs))
        if cached is not None:
            ctx.log(f"  teacher targets: cached by the subspaces stage ({len(train.images)} images, float16)")
        return cached

    def prepare_method(self, ctx: StageContext, models: Models):
        cfg = ctx.config.distill
        method_cls = METHODS.get(cfg.method)
        pairs = layer_pairs(cfg.layers, models, ctx.log) if method_cls.uses_layers else []
        subspaces = ctx.inputs["subspaces"].dir if "subspaces" in ctx.inputs else None
        return method_cls(cfg, pairs=pairs, teacher=models.teacher, student=models.student, models=models,
                          subspaces_dir=subspaces)

    def save(self, ctx: StageContext, models: Models, data) -> None:
        view = models.student_view
        save_model(models.student.cpu(), ctx.out, StudentSpec(
            arch=ctx.config.student.arch, num_classes=data.num_classes, input=view, class_names=tuple(data.class_names),
            teacher_input=models.teacher_view, class_ids=tuple(int(i) for i in data.class_ids),
            teacher_ids=tuple(models.teacher_ids), params=count_params(models.student),
            macs=count_macs(models.student, (view.channels, view.size, view.size))))

    def measure(self, ctx: StageContext, models: Models, data, known=None) -> dict:
        sv, tv = models.student_view, models.teacher_view
        student_logits = predict_logits(models.student.to(ctx.device), sv, data.test.images, ctx.device)
        teacher_test = teacher_logits(models.teacher, tv, data.test.images, ctx.device, models.teacher_ids, known)
        student_macs = count_macs(models.student, (sv.channels, sv.size, sv.size))
        teacher_macs = count_macs(models.teacher, (tv.channels, tv.size, tv.size))
        return {
            "teacher_test_acc": accuracy(teacher_test, data.test.labels),
            "student_test_acc": accuracy(student_logits, data.test.labels),
            "agreement_with_teacher": float((student_logits.argmax(1) == teacher_test.argmax(1)).float().mean()),
            "student_params": count_params(models.student), "teacher_params": count_params(models.teacher),
            "student_macs": student_macs, "teacher_macs": teacher_macs,
            "mac_reduction": teacher_macs / max(student_macs, 1),
            "test_images": len(data.test),
        }

