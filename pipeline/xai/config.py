"""Config section `validate.explain`: heatmap agreement between teacher and student (None: not computed)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from ..schema import Section


class ExplainConfig(Section):
    images: int = Field(64, ge=2, le=4096, description="test images explained (a seeded sample of the test split)")
    grid: int = Field(6, ge=1, le=32, description="rows of the report's grid: image, teacher heatmap, student heatmap")
    method: Literal["lrp", "gradient_x_input"] = Field(
        "lrp", description="lrp: zennit composites (gradient x input where no LRP rules fit the architecture)")
    composite: Literal["epsilon_gamma_box", "epsilon_plus_flat"] = Field(
        "epsilon_gamma_box", description="zennit composite for both models (ZBox/flat first layer, gamma/z+ convs, "
        "epsilon on linear layers)")
    size: Optional[int] = Field(None, ge=4, description="common resolution of the compared heatmaps "
                                "(None: the dataset's image side)")
    flip_steps: int = Field(10, ge=2, le=100, description="pixel-flipping curve: steps from 0 to 100 % of the pixels")
    batch_size: int = Field(32, ge=1, description="images per attribution batch")
