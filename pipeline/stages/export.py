"""Stage `export`: write every configured format, check each against its PyTorch model, list them."""

from __future__ import annotations

import numpy as np
import torch

from exporters.artifacts import ArtifactListing
from exporters.config import MOBILE_FORMATS, ExportConfig, in_order
from exporters.eval_set import write_npz
from exporters.formats import EXPORT_FORMATS, ExportJob, check_format_names
from exporters.metadata import artifact_config_digest, model_metadata, preprocessing

from ..models.spec import StudentSpec
from ..seeds import seed_for
from ..stage import Stage, StageContext


class ExportStage(Stage):
    name = "export"
    sections = ("export", "data", "subtask")
    packages = ("torch", "nncf", "torchao", "onnx", "onnxruntime", "openvino", "polygraphy", "tensorrt",
                "litert-torch", "ai-edge-litert", "executorch", "tflite-micro", "ethos-u-vela")

    def key_sections(self, cfg) -> dict:
        keys = super().key_sections(cfg)
        if cfg.ood is not None:
            keys = {**keys, "ood": cfg.ood.model_dump(mode="json")}
        return {**keys, **ethos_u_ini_digest(cfg.section("export"))}

    def inputs(self, cfg):
        # The config refuses INT8 formats without a qat section; pipeline/preflight.py a missing `mobile` extra.
        check_format_names(cfg.section("export").formats)
        return ("adapt", "distill", "qat") if cfg.section("qat") is not None else ("adapt", "distill")

    def run(self, ctx: StageContext) -> dict:
        from pipeline.data.for_config import subtask_data

        cfg: ExportConfig = ctx.config.section("export")
        data = subtask_data(ctx.config)
        job, spec = self.prepare(ctx, cfg, data)
        ood = self.prepare_ood(ctx, job, spec, data, cfg)  # None without an `ood` section
        artifacts = [a for name in in_order(cfg.formats) for a in EXPORT_FORMATS.get(name)(job)]
        eval_info = self.write_eval_set(ctx, job, spec, data, cfg, ood.arrays if ood else {})
        if ood:
            ood.attach(artifacts)
            eval_info.update(ood.info, arrays=sorted([*eval_info["arrays"], *ood.arrays]))
        self.write_listing(ctx, artifacts, spec, eval_info, job.meta)
        return {**self.measure(ctx, artifacts), **({"ood": ood.metrics} if ood else {})}

    def prepare_ood(self, ctx: StageContext, job: ExportJob, spec: StudentSpec, data, cfg: ExportConfig):
        """Thresholds calibrated on validation data, before any artifact is written: they are in its metadata."""
        from pipeline.ood.export import prepare_ood

        ood = prepare_ood(ctx.config, job.models, spec.input, data, cfg.eval_images, ctx.log)
        if ood is not None:
            job.meta["ood"] = ood.metadata()
        return ood

    def write_listing(self, ctx: StageContext, artifacts: list[dict], spec: StudentSpec, eval_info: dict, meta: dict) -> None:
        """artifacts.json: what the device tests and the release read (files, hashes, preprocessing, parity)."""
        ArtifactListing(tuple(artifacts), preprocessing(spec), spec.class_names, eval_info, meta).write(ctx.out)

    def measure(self, ctx: StageContext, artifacts: list[dict]) -> dict:
        for a in artifacts:
            ctx.log(f"export: {a['file']:<28} {a['size'] / 1024:8.1f} KiB  parity {summary(a['parity'])}")
        checked = [a for a in artifacts if a["parity"]]
        return {"artifacts": {a["file"]: {"size": a["size"], "parity": a["parity"]} for a in artifacts},
                "val_accuracy": {a["file"]: a["parity"]["accuracy"] for a in checked},
                "min_top1_agreement": min((a["parity"]["top1_agreement"] for a in checked), default=None)}

    def prepare(self, ctx: StageContext, cfg: ExportConfig, data) -> tuple[ExportJob, StudentSpec]:
        from pipeline.models import load_student
        from quantize.model_io import load_quantized_student

        student, spec = load_student(ctx.inputs["distill"].dir)
        quantized = load_quantized_student(ctx.inputs["qat"].dir)[0] if "qat" in ctx.inputs else None
        view = spec.input
        parity_set = data.val.images[:cfg.parity_limit]
        job = ExportJob(
            out=ctx.out, cfg=cfg, log=ctx.log,
            meta=model_metadata(spec, artifact_config_digest(ctx.config), cfg.dynamic_batch, build_key=ctx.key),
            example=view(torch.as_tensor(data.val.images[:1])),
            models={"fp32": student.eval(), "int8": quantized},
            parity_inputs=view(torch.as_tensor(parity_set)).numpy(),
            parity_labels=data.val.labels[:cfg.parity_limit],
            calibration=self.calibration(ctx, data, view),
        )
        return job, spec

    def calibration(self, ctx: StageContext, data, view) -> list[torch.Tensor]:
        """The qat stage's own calibration images (same size, same seed), for the mobile formats' PT2E INT8."""
        from quantize.nncf_ops import calibration_images

        qat = ctx.config.section("qat")
        if qat is None or not set(MOBILE_FORMATS).intersection(ctx.config.section("export").formats):
            return []
        return calibration_images(data.train.images, view, qat.calibration_size, seed_for(ctx.config, "qat.calibration"))

    def write_eval_set(self, ctx: StageContext, job: ExportJob, spec: StudentSpec, data, cfg: ExportConfig,
                       extra: dict | None = None) -> dict:
        """Raw uint8 test images plus what the teacher, the FP32 and the INT8 student predict for them
        (`extra`: more arrays, e.g. the out-of-subtask images of pipeline.ood)."""
        from pipeline.models import load_teacher

        images, labels = data.test.images[:cfg.eval_images], data.test.labels[:cfg.eval_images]
        teacher, teacher_spec = load_teacher(ctx.inputs["adapt"].dir)
        arrays = {"images_u8": images, "labels": labels.astype(np.int64),
                  "teacher_pred": predict(teacher.to(ctx.device), teacher_spec.input, images, ctx.device,
                                          list(spec.teacher_ids))}
        for precision, model in job.models.items():
            if model is not None:
                arrays[f"{precision}_pred"] = predict(model, spec.input, images, torch.device("cpu"))
        write_npz(ctx.out / "eval.npz", {**arrays, **(extra or {})})
        return {"file": "eval.npz", "images": int(len(labels)), "arrays": sorted(arrays),
                "accuracy": {k.removesuffix("_pred"): float((v == labels).mean())
                             for k, v in arrays.items() if k.endswith("_pred")}}


def ethos_u_ini_digest(cfg: ExportConfig) -> dict:
    """The content of a user's Vela .ini (export.ethos_u.ini): editing the file recompiles, as a new path would.
    A missing file adds nothing; preflight reports it."""
    import hashlib
    from pathlib import Path

    if "ethos_u" not in cfg.formats or not cfg.ethos_u.ini or not Path(cfg.ethos_u.ini).is_file():
        return {}
    return {"ethos_u_ini_sha256": hashlib.sha256(Path(cfg.ethos_u.ini).read_bytes()).hexdigest()}


def predict(model, view, images, device, columns=None) -> np.ndarray:
    from pipeline.models.predict import predict_logits

    return predict_logits(model, view, images, device, columns=columns).argmax(1).numpy().astype(np.int64)


def summary(checked: dict | None) -> str:
    if not checked:
        return "n/a (not run on this machine)"
    return (f"max|dlogit| {checked['max_abs_logit_diff']:.2e}  top-1 agree {checked['top1_agreement']:.4f}  "
            f"acc {checked['accuracy']:.4f} (torch {checked['reference_accuracy']:.4f})")
