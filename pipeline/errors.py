"""Errors a user can cause. Each says what was wrong and how to fix it; the CLI prints them without a
traceback and exits with code 2."""

from __future__ import annotations


class EdgesmithError(Exception):
    """Base of every user-facing error: `problem` says what is wrong, `fix` how to put it right."""

    exit_code = 2

    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem.strip()
        self.fix = fix.strip()
        super().__init__(self.message)

    @property
    def message(self) -> str:
        # A problem that ends in a list of bullets gets its fix on a line of its own, not glued to the last one.
        return f"{self.problem}{chr(10) if chr(10) in self.problem else ' '}{self.fix}".strip()


class ConfigError(EdgesmithError):
    """The config file is malformed or names something that does not exist."""


class DataError(EdgesmithError):
    """Dataset files are missing, unreadable or do not hold what the config asks for."""


class ModelError(EdgesmithError):
    """A model name, weights file or checkpoint cannot be used."""


class DeviceError(EdgesmithError):
    """The requested compute device or target is not available."""


class CacheBusyError(EdgesmithError):
    """Another build holds the cache lock."""


class CacheError(EdgesmithError):
    """The build folder (build.output/build.name) cannot be created or written: a file in the way, no permission,
    a read-only disk."""


class BudgetError(EdgesmithError):
    """A validation budget was missed; the results are recorded nonetheless."""

    exit_code = 1


class DistributedError(EdgesmithError):
    """A multi-process build cannot run as launched (e.g. a cache folder the other nodes cannot see)."""


class DiskFullError(EdgesmithError):
    """The disk holding the build folder filled up while a stage was writing; nothing half-written was kept."""

    exit_code = 1
