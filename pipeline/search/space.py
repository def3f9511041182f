"""The search space: an Optuna trial's choices -> a Candidate, a student `arch` name plus an input size that
create_model and the rest of the chain already understand."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import ConfigError
from ..models.cnn import cnn_name
from ..registry import did_you_mean
from .config import CnnFamily, TimmFamily


@dataclass(frozen=True)
class Candidate:
    arch: str
    resolution: int

    @property
    def label(self) -> str:
        return f"{self.arch}@{self.resolution}"

    def to_json(self) -> dict:
        return asdict(self)


def cnn_layers(blocks: int, width: int, downsamples: int) -> tuple[list[int], list[int]]:
    """Widths and strides: block 0 at full resolution, then `downsamples` stride-2 blocks that each double the
    width, then the rest at the last resolution and width."""
    downsamples = min(downsamples, blocks - 1)
    widths, strides = [width], [1]
    for i in range(1, blocks):
        down = i <= downsamples
        widths.append(widths[-1] * 2 if down else widths[-1])
        strides.append(2 if down else 1)
    return widths, strides


def suggest(trial, families: list) -> Candidate:
    """One candidate from the trial's choices; each family's parameters carry its index, so families never share
    (conditional) parameters."""
    index = trial.suggest_categorical("family", list(range(len(families)))) if len(families) > 1 else 0
    family = families[index]
    p = f"f{index}."
    if isinstance(family, CnnFamily):
        widths, strides = cnn_layers(trial.suggest_categorical(p + "blocks", family.blocks),
                                     trial.suggest_categorical(p + "width", family.widths),
                                     trial.suggest_categorical(p + "downsamples", family.downsamples))
        arch = cnn_name(widths, strides, trial.suggest_categorical(p + "separable", family.separable))
    else:
        arch = trial.suggest_categorical(p + "name", family.names)
    return Candidate(arch, trial.suggest_categorical(p + "resolution", family.resolutions))


def space_size(families: list) -> int:
    total = 0
    for f in families:
        if isinstance(f, CnnFamily):
            total += len(f.blocks) * len(f.widths) * len(f.downsamples) * len(f.separable) * len(f.resolutions)
        else:
            total += len(f.names) * len(f.resolutions)
    return total


def check_families(families: list) -> None:
    """Unknown timm names fail before anything runs, with the nearest names timm knows."""
    timm_names = [n for f in families if isinstance(f, TimmFamily) for n in f.names]
    if not timm_names:
        return
    import timm

    for name in timm_names:
        if not timm.is_model(name):
            hint = did_you_mean(name, timm.list_models(name[:4] + "*") or timm.list_models())
            raise ConfigError(f"search.families names '{name}', which is not a timm architecture.{hint}",
                              "Use names from timm.list_models() (e.g. mobilenetv3_small_050, mnasnet_small), or "
                              "search edgesmith's CNN family (family: cnn).")
