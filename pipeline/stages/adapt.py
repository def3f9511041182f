"""Stage `adapt`: give the teacher a head over the classes that have labels (finetune, linear probe or none) and
keep its logits on every image it saw for later stages."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import nn

from ..data import View
from ..data.for_config import subtask_data
from ..models import count_macs, count_params, load_teacher, save_model
from ..models.adapt import classifier_name, fit_on_images, fit_tail_on_cached, labelled_classes, labelled_split, teacher_class_ids
from ..models.fit import FitSettings
from ..models.known_logits import save_known_logits, teacher_logits
from ..models.predict import accuracy
from ..seeds import seed_for
from ..stage import Stage, StageContext
from .teacher import TEACHER_CODE


class AdaptStage(Stage):
    name = "adapt"
    sections = ("teacher", "data", "subtask", "build")
    packages = ("torch", "timm")
    code = TEACHER_CODE

    def inputs(self, cfg):
        return ("teacher",)

    def run(self, ctx: StageContext) -> dict:
        cfg = ctx.config
        data = subtask_data(cfg)
        model, spec = load_teacher(ctx.inputs["teacher"].dir)
        view = spec.input
        method = cfg.teacher.adapt.method
        fit_metrics, names, known = {}, spec.class_names, None
        test_logits = None
        if method != "none":
            fit_metrics, known, test_logits = self.fit_new_head(ctx, model, view, data)
            names = labelled_classes(data)
        save_model(model, ctx.out, replace(spec, num_classes=len(names), class_names=tuple(names)))
        metrics, test_logits = self.measure(ctx, model, view, data, names, test_logits)
        if known is not None:
            images, logits = known
            fit_metrics["known_logits"] = save_known_logits(ctx.out, np.concatenate([images, data.test.images]),
                                                            torch.cat([logits, test_logits]))
        return {**fit_metrics, **metrics}

    def fit_new_head(self, ctx: StageContext, model: nn.Module, view: View, data) -> tuple[dict, tuple | None,
                                                                                          torch.Tensor | None]:
        """Returns the fit's metrics; when the tail was trained on a cached prefix, (images, logits) of the
        finished teacher on every image it saw (saved for later stages: pipeline.models.known_logits); and with
        adapt.heads, the heads' mean logits on the test split."""
        adapt = ctx.config.teacher.adapt
        model.reset_classifier(len(labelled_classes(data)))
        model.to(ctx.device)
        first_trainable = adapt.train_from or (classifier_name(model) if adapt.method == "linear_probe" else None)
        train, val = labelled_split(ctx.config, data)
        if adapt.max_images and adapt.max_images < len(train):
            keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed_for(ctx.config, "adapt.images")))
            train = train.take(keep[: adapt.max_images].sort().values.numpy())
        settings = FitSettings(adapt.epochs, adapt.lr, adapt.weight_decay, adapt.batch_size,
                               seed_for(ctx.config, "adapt.batches"), keep_last=adapt.keep == "last")
        known, test_logits = None, None
        if first_trainable is None:
            result = fit_on_images(ctx, model, view, train, val, settings, f"adapt ({adapt.method})", "adapt.augment")
        else:
            heads = adapt.heads or 1
            result = fit_tail_on_cached(ctx, model, view, train, val, settings, first_trainable, data.pool, heads,
                                        data.test.images if heads > 1 else None, adapt.augment_copies or 1)
            seen = [train.images, val.images] + ([data.pool.images] if data.pool is not None else [])
            known, test_logits = (np.concatenate(seen), result.pop("logits")), result.pop("test_logits", None)
        model.cpu().eval()
        budget = {} if not data.few_labels else {"labels_per_class": data.labels_per_class,
                                                 "adapt_val_images": len(val), "label_budget": data.budget}
        heads = {"adapt_heads": adapt.heads, "adapt_heads_val_acc": result["heads_val_acc"]} \
            if "heads_val_acc" in result else {}
        return {"adapt_best_val_acc": result["best_val_acc"], "adapt_best_epoch": result["best_epoch"],
                "adapt_history": result["history"], "adapt_train_images": len(train),
                "adapt_train_views": result.get("train_views", len(train)), **budget, **heads}, known, test_logits

    def measure(self, ctx: StageContext, model: nn.Module, view: View, data, names: list[str],
                logits: torch.Tensor | None = None) -> tuple[dict, torch.Tensor]:
        """Test accuracy of the teacher: `logits` are the heads' mean when adapt.heads trained several."""
        ids = teacher_class_ids(names, data)
        if logits is None:
            logits = teacher_logits(model, view, data.test.images, ctx.device)
        model.cpu()
        return {"teacher_subtask_test_acc": accuracy(logits[:, ids], data.test.labels), "teacher_subtask_ids": ids,
                "params": count_params(model), "macs": count_macs(model, (view.channels, view.size, view.size))}, logits
