"""Config section `export` (placeholder; filled in by the export work)."""

from __future__ import annotations

from pipeline.schema import Section


class ExportConfig(Section):
    pass
