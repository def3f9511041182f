"""Config section `ood`: a calibrated "unknown" answer for inputs outside the subtask. None (left out of the
YAML) disables it, so configs without it keep their cache keys."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from ..schema import OmitNoneOptions, Section


class MinedOutliersConfig(Section):
    neighbours: int = Field(5, ge=1, description="k of the distance to the k-th nearest labelled training image on "
                            "the embedding of the teacher before adaptation")
    quantile: float = Field(0.95, gt=0, le=1, description="a pool image is an outlier when it lies farther than this "
                            "quantile of the held-out labelled images' own distances")
    distill: bool = Field(True, description="whether the mined images stay in the distillation transfer set (the "
                          "student also learns the teacher's answers on them); false: outlier exposure only")


class OODConfig(OmitNoneOptions):
    omit_when_none = ("mined_outliers",)

    score: Literal["msp", "energy", "max_logit"] = Field(
        "energy", description="msp: max softmax(z/T); energy: T*logsumexp(z/T); max_logit: max z (higher = in-subtask)")
    temperature: float = Field(1.0, gt=0, description="T of msp and energy (max_logit ignores it)")
    tpr: float = Field(0.95, gt=0, le=1, description="fraction of in-subtask VALIDATION images the threshold keeps")
    eval_images: int = Field(2000, ge=1, description="out-of-subtask TEST images (the dataset's other classes) "
                             "evaluated at export and shipped in eval.npz")
    outlier_exposure: bool = Field(False, description="distill also on the teacher's non-subtask training images")
    oe_target: Literal["uniform", "teacher"] = Field(
        "uniform", description="what the student matches on outlier images: uniform over the subtask classes, or "
        "the teacher's subtask probabilities renormalised (softmax of its subtask logits / distill.temperature)")
    oe_weight: float = Field(0.5, ge=0, description="weight of the outlier-exposure loss next to the distillation loss")
    oe_ratio: float = Field(1.0, gt=0, description="outlier images per in-subtask image in each training batch")
    oe_max_images: int | None = Field(None, ge=1, description="cap on outlier training images (None: all of them)")
    mined_outliers: Optional[MinedOutliersConfig] = Field(
        None, description="outlier exposure trains on the unlabelled pool's images that lie farthest from the "
        "labelled subtask images (no label needed: allowed under a label budget) instead of the other classes' "
        "training images; None: the other classes")

    def exposure_key(self) -> dict | None:
        """The keys that change the student (hashed into the distill stage's key), None when exposure is off."""
        if not self.outlier_exposure:
            return None
        return self.model_dump(mode="json", include={"outlier_exposure", "oe_target", "oe_weight", "oe_ratio",
                                                     "oe_max_images", "mined_outliers"})
