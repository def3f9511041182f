"""Errors a user can cause while quantizing."""

from pipeline.errors import EdgesmithError


class QuantizationError(EdgesmithError):
    """NNCF cannot quantize the model as configured."""
