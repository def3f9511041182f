"""Config section `release` (placeholder; filled in by the release work)."""

from __future__ import annotations

from ..schema import Section


class ReleaseConfig(Section):
    pass
