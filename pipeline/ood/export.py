"""What the export stage does for the unknown answer: calibrate a threshold per precision (FP32 student,
INT8 model) on in-subtask VALIDATION images, evaluate it against the dataset's other classes on the TEST split
(the same images eval.npz ships), and hand each artifact its rule (score, temperature, threshold)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from device_tests.ood import Rule, evaluate

from .calibration import logits_of, make_rule
from .config import OODConfig
from .data import first, outside_data


@dataclass
class ExportOOD:
    cfg: OODConfig
    rules: dict[str, Rule]                  # per precision of the torch models ("fp32", "int8")
    metrics: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)   # added to eval.npz
    info: dict = field(default_factory=dict)     # added to artifacts.json's eval_set

    def metadata(self) -> dict:
        """Stamped into every artifact's metadata (ONNX metadata_props, IR rt_info, sidecars)."""
        return {"score": self.cfg.score, "temperature": self.cfg.temperature, "tpr": self.cfg.tpr,
                "thresholds": {p: r.threshold for p, r in sorted(self.rules.items())},
                "unknown_label": -1, "rule": "score(logits) < thresholds[precision] -> unknown"}

    def rule_for(self, precision: str) -> Rule:
        # fp16 engines and anything not quantized use the FP32 threshold
        return self.rules.get(precision, self.rules["fp32"])

    def attach(self, artifacts: list[dict]) -> None:
        """Each artifacts.json entry gets the rule the device applies to it."""
        for a in artifacts:
            a["ood"] = self.rule_for(a.get("precision", "fp32")).to_dict()


def prepare_ood(config, models: dict, view, data, eval_images: int, log=print) -> ExportOOD | None:
    """None without an `ood` section. `models`: precision -> torch model (None when absent)."""
    cfg: OODConfig | None = getattr(config, "ood", None)
    if cfg is None:
        return None
    classes = list(outside_data(config).class_names)
    outside = first(outside_data(config).test, cfg.eval_images)
    inside = data.test.take(np.arange(min(eval_images, len(data.test))))  # eval.npz's in-subtask images
    rules, metrics, test_logits = {}, {}, {}
    for precision, model in models.items():
        if model is None:
            continue
        rules[precision] = make_rule(logits_of(model, view, data.val.images), cfg)
        test_logits[precision] = (logits_of(model, view, inside.images), logits_of(model, view, outside.images))
        metrics[precision] = evaluate(*_with_labels(test_logits[precision], inside.labels), rules[precision],
                                      with_histogram=False)
    if "int8" in rules:
        # Quantization moves the scores: the FP32 threshold applied to the INT8 model, for comparison.
        fp32_rule = Rule(cfg.score, cfg.temperature, rules["fp32"].threshold, cfg.tpr)
        metrics["int8_with_fp32_threshold"] = evaluate(*_with_labels(test_logits["int8"], inside.labels), fp32_rule,
                                                       with_histogram=False)
    for name, m in metrics.items():
        log(f"export: ood {name:<24} {cfg.score} T={cfg.temperature:g} threshold {m['threshold']:.4f}  "
            f"AUROC {m['auroc']:.4f}  FPR@95 {m['fpr95']:.4f}  kept {m['tpr_at_threshold']:.3f}  "
            f"outside accepted {m['fpr_at_threshold']:.3f}  acc accepted {m['accuracy_accepted']:.4f}")
    export = ExportOOD(cfg, rules)
    export.metrics = {**export.metadata(), "calibration_images": int(len(data.val)),
                      "outside_classes": classes, **metrics}
    export.arrays = {"ood_images_u8": outside.images, "ood_classes": outside.labels.astype(np.int64)}
    export.info = {"ood_images": int(len(outside)), "ood_class_names": classes}
    return export


def _with_labels(pair: tuple[np.ndarray, np.ndarray], labels: np.ndarray):
    return pair[0], labels, pair[1]
