"""What the validate stage calls when `validate.explain` is set: explain the distilled FP32 student and the adapted
teacher on the test split, save explain.npz / explain.json, and return the metrics and the report section."""

from __future__ import annotations

import json

import numpy as np


def run_explain(ctx, cfg) -> tuple[dict, list]:
    """`cfg` is the ExplainConfig; needs ctx.inputs 'adapt' and 'distill'."""
    from ..data.for_config import subtask_data
    from ..models import load_student, load_teacher
    from .explain import explain_pair
    from .report import explain_section

    data = subtask_data(ctx.config)
    teacher, t_spec = load_teacher(ctx.inputs["adapt"].dir)
    student, s_spec = load_student(ctx.inputs["distill"].dir)
    ctx.log(f"validate: explaining {cfg.images} test images (teacher and student, {cfg.method})")
    result = explain_pair(teacher, s_spec.teacher_input, list(s_spec.teacher_ids), student,
                          s_spec.input, data.test.images, data.test.labels, cfg, ctx.config.build.seed)
    np.savez_compressed(ctx.out / "explain.npz", **result.arrays())
    (ctx.out / "explain.json").write_text(json.dumps(result.metrics, indent=1, sort_keys=True) + "\n")
    ctx.log(f"validate: heatmap agreement teacher/student: cosine {result.metrics['cosine_mean']:.3f}, "
            f"Spearman {result.metrics['spearman_mean']:.3f} ({result.metrics['teacher']['method']} / "
            f"{result.metrics['student']['method']})")
    return result.metrics, [explain_section(result.metrics, result.arrays(), data.class_names, cfg.grid)]

