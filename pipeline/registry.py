"""Small name -> object registries filled by a decorator; a wrong name lists the valid ones."""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from .errors import ConfigError

T = TypeVar("T")


def did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(str(name), choices, n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._retired: dict[str, str] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return add

    def retire(self, name: str, why: str) -> None:
        """A name that was taken out: asking for it says why and what to use instead (not just "unknown")."""
        self._retired[name] = why

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            names = sorted(self._items)
            if name in self._retired:
                raise ConfigError(f"The {self.kind} '{name}' was removed: {self._retired[name]}",
                                  f"Valid names: {', '.join(names)}.") from None
            raise ConfigError(
                f"Unknown {self.kind} '{name}'.{did_you_mean(name, names)}",
                f"Valid names: {', '.join(names)}.",
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
