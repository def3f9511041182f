"""Config section `validate` (placeholder; filled in by the validation work)."""

from __future__ import annotations

from ..schema import Section


class ValidateConfig(Section):
    pass
