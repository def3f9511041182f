"""Base class for config sections: frozen, unknown keys rejected."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, model_serializer


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class OmitNoneOptions(Section):
    """A section whose optional sub-sections (named in `omit_when_none`) are left out of its dump while they are
    None: adding such an option to an existing section keeps the cache keys and config digests of every config
    that does not use it."""

    omit_when_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _drop_unset_options(self, handler):
        data = handler(self)
        if isinstance(data, dict):
            for name in self.omit_when_none:
                if getattr(self, name, None) is None:
                    data.pop(name, None)
        return data
