"""Errors a user can cause while exporting."""

from pipeline.errors import EdgesmithError


class ExportError(EdgesmithError):
    """A model cannot be written in the requested format."""
