"""Stage `teacher`: obtain the foundation model (a named source) or train a small CNN from scratch."""

from __future__ import annotations

from ..data import View
from ..data.for_config import subtask_data
from ..models import TeacherSpec, count_macs, count_params, create_model, save_model
from ..models.adapt import (
    fit_on_images,
    head_class_names,
    labelled_classes,
    labelled_split,
    num_outputs,
    teacher_arch,
    teacher_view,
)
from ..models.fit import FitSettings
from ..models.teachers import TEACHER_SOURCES
from ..seeds import seed_for
from ..stage import Stage, StageContext

# The teacher and adapt stages hash only the code they run, so that editing a later stage keeps the (slow) adapted
# teacher cached.
TEACHER_CODE = ("pipeline/models", "pipeline/data", "pipeline/stages/teacher.py", "pipeline/stages/adapt.py",
                "pipeline/stage.py", "pipeline/runner.py", "pipeline/cache.py")


class TeacherStage(Stage):
    name = "teacher"
    sections = ("teacher", "data", "build")
    packages = ("torch", "timm")
    code = TEACHER_CODE

    def run(self, ctx: StageContext) -> dict:
        cfg = ctx.config
        data = subtask_data(cfg)
        if cfg.teacher.source == "train":
            model, view, metrics = self.train_from_scratch(ctx, data)
        else:
            model = TEACHER_SOURCES.get(cfg.teacher.source)(cfg, in_chans=(cfg.teacher.input.channels or 3))
            view, metrics = teacher_view(cfg, model, data.dataset), {}
        names = head_class_names(cfg, num_outputs(model), data)
        save_model(model, ctx.out, TeacherSpec(teacher_arch(cfg), len(names), view, tuple(names)))
        return {**metrics, "params": count_params(model), "macs": count_macs(model, (view.channels, view.size, view.size))}

    def train_from_scratch(self, ctx: StageContext, data):
        """For users without a foundation model: a small CNN trained on ALL classes of the dataset (under a label
        budget: on the subtask's labelled images only)."""
        cfg, dataset = ctx.config, data.dataset
        train, val = labelled_split(cfg, data)
        model = create_model(cfg.teacher.train.arch, len(labelled_classes(data)), cfg.teacher.input.channels or dataset.channels)
        view = View.resolve(cfg.teacher.input, dataset.size, dataset.channels)
        settings = FitSettings(cfg.teacher.train.epochs, cfg.teacher.train.lr, 1e-4, cfg.teacher.train.batch_size,
                               seed_for(cfg, "teacher.batches"))
        result = fit_on_images(ctx, model.to(ctx.device), view, train, val, settings, "teacher (from scratch)", "teacher.augment")
        return model.cpu(), view, {"train_best_val_acc": result["best_val_acc"], "train_best_epoch": result["best_epoch"]}
