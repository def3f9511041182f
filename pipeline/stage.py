"""The stage API: what a stage declares (name, the config and packages in its key, its inputs) and what it is
given (StageContext) and hands on (StageRecord). The runner (pipeline/runner.py) plans and runs the chain;
the stages themselves are the recipes in pipeline/stages/."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .cache import CODE_PACKAGES
from .config import OPTIONAL_SECTIONS, EdgesmithConfig
from .progress import ProgressDisplay


@dataclass(frozen=True)
class StageRecord:
    """A committed stage output: its folder and its stage.json."""

    name: str
    key: str
    dir: Path
    meta: dict

    @property
    def metrics(self) -> dict:
        return self.meta.get("metrics", {})


@dataclass
class StageContext:
    config: EdgesmithConfig
    out: Path
    inputs: dict[str, StageRecord]
    progress: ProgressDisplay
    key: str
    device_name: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self):
        import torch

        return torch.device(self.device_name)

    def log(self, message: str) -> None:
        self.progress.log(message)


class Stage:
    """One step of the chain. Subclasses set `name`, the config `sections` in their key, and implement run()."""

    name: ClassVar[str]
    sections: ClassVar[tuple[str, ...]] = ()
    packages: ClassVar[tuple[str, ...]] = ("torch",)
    code: ClassVar[tuple[str, ...]] = CODE_PACKAGES
    # Under torchrun: True runs the stage in every process (it shares its work out with pipeline.distributed);
    # False runs it in rank 0 alone while the others wait for its committed result.
    distributed: ClassVar[bool] = False

    def enabled(self, cfg: EdgesmithConfig) -> bool:
        """In the chain when every optional section (one the config may leave out) it hashes is set."""
        return all(cfg.section(s) is not None for s in self.sections if s in OPTIONAL_SECTIONS)

    def inputs(self, cfg: EdgesmithConfig) -> tuple[str, ...]:
        return ()

    def key_sections(self, cfg: EdgesmithConfig) -> dict:
        """The config hashed into the key: `sections`; a stage may add optional parts only when they are set."""
        return {s: cfg.build.result_fields() if s == "build" else dump_section(cfg.section(s)) for s in self.sections}

    def run(self, ctx: StageContext) -> dict:
        raise NotImplementedError

    def reusable(self, meta: dict) -> bool:
        """Whether a committed result may be served from the cache. A stage says no for a result that records a
        failure of the world rather than of the build (a target that could not be reached): the next build
        tries again instead of replaying the failure."""
        return True

    def after_commit(self, record: StageRecord, ctx: StageContext) -> None:
        """The verdict of a result, on every build that uses it, whether it ran now or came from the cache:
        checks that may fail the build (budgets) are a property of the build, not of one stage run."""


def dump_section(section: Any) -> Any:
    return section.model_dump(mode="json") if hasattr(section, "model_dump") else section
