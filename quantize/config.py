"""Config section `qat` (placeholder; filled in by the quantization work)."""

from __future__ import annotations

from pipeline.schema import Section


class QATConfig(Section):
    pass
