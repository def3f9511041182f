"""Stage `qat`: fold BatchNorm, calibrate INT8 quantizers with NNCF, fine-tune against the teacher, save.

Output: quantized.json (the student's spec + fold_bn + the qat section), quantized.nncf.json (where NNCF's
quantizers sit: nncf.torch.get_config), quantized.pt (state_dict with weights and quantizer scales).
Reload with quantize.model_io.load_quantized_student(dir). Metrics: fp32/ptq/int8 validation accuracy,
fp32/int8 test accuracy, the QAT validation history (index 0 = after calibration), BN-folding check.
QAT trains on un-augmented images so the teacher's logits are computed once.
"""

from __future__ import annotations

import torch

from quantize.config import QATConfig
from quantize.fold import fold_batchnorm, max_output_difference
from quantize.layer_error import torch_layer_error
from quantize.model_io import QuantizedSpec, save_quantized_student
from quantize.nncf_ops import calibration_images
from quantize.precision import ERROR_IMAGES, quantize_student
from quantize.qat import TrainSet, distillation_loss, finetune, model_accuracy

from .. import distributed
from ..models.spec import StudentSpec
from ..seeds import seed_for
from ..stage import Stage, StageContext


class QATStage(Stage):
    name = "qat"
    sections = ("qat", "distill", "data", "subtask")
    packages = ("torch", "nncf", "torchao")
    distributed = True        # under torchrun every process fine-tunes on its share of each global batch (DDP)

    def inputs(self, cfg):
        return ("adapt", "distill")

    def run(self, ctx: StageContext) -> dict:
        from pipeline.data.for_config import subtask_data
        from pipeline.models import load_student

        cfg: QATConfig = ctx.config.section("qat")
        student, spec = load_student(ctx.inputs["distill"].dir)
        data = subtask_data(ctx.config)
        view = spec.input
        float_model, metrics = self.prepare(ctx, student, cfg, view, data)
        calibration = calibration_images(data.train.images, view, cfg.calibration_size, seed_for(ctx.config, "qat.calibration"))
        model = self.quantize(ctx, float_model, calibration, view, data, cfg, metrics)
        metrics["ptq_val_acc"] = model_accuracy(model, view, data.val.images, data.val.labels)
        if cfg.mode == "qat":
            metrics["qat_val_history"] = self.finetune(ctx, model, spec, view, data, cfg)
        metrics["layer_error"] = torch_layer_error(float_model, model, torch.cat(calibration[:ERROR_IMAGES]))
        save_quantized_student(model, ctx.out, QuantizedSpec(spec, cfg.fold_bn, cfg.model_dump(mode="json")))
        return self.measure(ctx, model, view, data, metrics)

    def quantize(self, ctx: StageContext, float_model, calibration, view, data, cfg: QATConfig, metrics: dict):
        """NNCF PTQ with the layers that stay in float left out (keep_fp32, or accuracy control)."""
        val_images = view(torch.as_tensor(data.val.images))
        model, info = quantize_student(float_model, calibration, val_images, data.val.labels, cfg,
                                       metrics["fp32_val_acc"], ctx.log)
        metrics.update(info)
        return model

    def prepare(self, ctx: StageContext, student, cfg: QATConfig, view, data) -> tuple[torch.nn.Module, dict]:
        """The float model NNCF sees (BatchNorm folded) and the FP32 reference accuracies."""
        metrics = {"fp32_val_acc": model_accuracy(student, view, data.val.images, data.val.labels),
                   "fp32_test_acc": model_accuracy(student, view, data.test.images, data.test.labels)}
        if not cfg.fold_bn:
            return student.eval(), metrics
        folded, left = fold_batchnorm(student)
        example = view(torch.as_tensor(data.val.images[:16]))
        metrics["fold_max_abs_diff"] = max_output_difference(student, folded, example)
        metrics["batchnorm_not_folded"] = left
        if left:
            ctx.log(f"qat: warning: {len(left)} BatchNorm layers are not right after a convolution and stay "
                    f"unfolded ({', '.join(left[:5])}): ONNX Runtime cannot fuse those INT8 blocks, so check the "
                    "INT8 latency (bench/quantization.py, the validate stage).")
        return folded, metrics

    def measure(self, ctx: StageContext, model, view, data, metrics: dict) -> dict:
        metrics["int8_val_acc"] = model_accuracy(model, view, data.val.images, data.val.labels)
        metrics["int8_test_acc"] = model_accuracy(model, view, data.test.images, data.test.labels)
        ctx.log(f"qat: fp32 val {metrics['fp32_val_acc']:.4f}  ptq {metrics['ptq_val_acc']:.4f}  "
                f"int8 val {metrics['int8_val_acc']:.4f}  test {metrics['int8_test_acc']:.4f}")
        return metrics

    def finetune(self, ctx: StageContext, model, spec: StudentSpec, view, data, cfg: QATConfig) -> list[float]:
        from pipeline.models import load_teacher
        from pipeline.models.known_logits import KnownLogits, teacher_logits

        teacher, teacher_spec = load_teacher(ctx.inputs["adapt"].dir)
        teacher_view = teacher_spec.input
        known = KnownLogits.load(ctx.inputs["adapt"].dir)     # logits the adapt stage already computed
        # Under torchrun each process runs the teacher on its share of the images and all gather the whole set.
        rows = distributed.row_range(len(data.train))
        teacher_logits = distributed.all_gather_rows(
            teacher_logits(teacher, teacher_view, data.train.images[rows], ctx.device, list(spec.teacher_ids), known),
            len(data.train))
        train = TrainSet(data.train.images, data.train.labels, teacher_logits)
        per_epoch = min(len(train.images), cfg.max_images or len(train.images))
        with ctx.progress.task("QAT fine-tuning", total=cfg.epochs * per_epoch) as task:
            return finetune(model, view, train, lambda m: model_accuracy(m, view, data.val.images, data.val.labels),
                            distillation_loss(ctx.config.distill), cfg.epochs, cfg.lr, cfg.batch_size,
                            seed=seed_for(ctx.config, "qat.batches"), max_images=cfg.max_images,
                            on_step=lambda n, loss: task.advance(n, loss=loss),
                            micro_batch=ctx.config.distributed.micro_batch if ctx.config.distributed else None)
