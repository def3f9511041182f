"""Errors a user can cause on the device side. Kept free of pipeline imports: a target has numpy and a runtime,
nothing more. Each error says what is wrong and how to fix it."""

from __future__ import annotations


class DeviceTestError(Exception):
    """Base of the device-side errors: `problem` says what is wrong, `fix` how to put it right."""

    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem.strip()
        self.fix = fix.strip()
        super().__init__(f"{self.problem} {self.fix}".strip())


class BundleError(DeviceTestError):
    """The bundle folder is missing files, or a file differs from what artifacts.json records."""


class UnknownRuntimeError(DeviceTestError):
    """A runtime name that no runner implements."""


class RuntimeUnavailableError(DeviceTestError):
    """The runtime is known but not installed (or not usable) on this machine: a skip, not a failure."""


class IncompatibleArtifactError(DeviceTestError):
    """The runtime cannot execute this artifact's format, or the input shape cannot be fed."""


class EvalSetError(DeviceTestError):
    """eval.npz is missing keys or holds arrays of the wrong shape."""
