"""Stages that live in their own packages; importing them registers them."""

import exporters.stage  # noqa: F401
import pipeline.release.stage  # noqa: F401
import pipeline.validation.stage  # noqa: F401
import quantize.stage  # noqa: F401
