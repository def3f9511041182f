"""Checks run before anything is built: names resolve, files exist, the data holds the subtask."""

from __future__ import annotations

from .errors import DataError, ModelError
from .registry import did_you_mean


def check_names(cfg) -> None:
    """Architecture, method and teacher names, and the extras the export formats need; raises the first problem
    (an unknown name with the valid ones)."""
    from exporters.mobile import check_mobile_extra

    from .distill.methods import METHODS
    from .models.registry import ARCHS

    if cfg.export is not None:
        check_mobile_extra(cfg.export.formats)  # installed packages: a fact of this machine, not of the config

    METHODS.get(cfg.distill.method)
    _check_arch(cfg.student.arch, ARCHS.names())
    if cfg.teacher.source == "train":
        _check_arch(cfg.teacher.train.arch, ARCHS.names())
    elif cfg.teacher.name:
        _check_arch(cfg.teacher.name, ARCHS.names())
    if cfg.teacher.weights:
        from .models.teachers import resolve_weights_path

        path = resolve_weights_path(cfg.teacher.weights)
        if not path.is_file():
            raise ModelError(f"teacher.weights {path} does not exist.", "Point teacher.weights at a state_dict file.")


def _check_arch(arch: str, own: list[str]) -> None:
    if arch in own:
        return
    import timm

    if not timm.is_model(arch):
        hint = did_you_mean(arch, own + timm.list_models(arch[:3] + "*"))
        raise ModelError(f"Unknown architecture '{arch}'.{hint}",
                         f"Use one of edgesmith's ({', '.join(own)}) or any timm model name (timm.list_models()).")


def check_data(cfg) -> tuple[object | None, str]:
    """The subtask data, or (None, why) when the dataset is not on this machine and the classes can still be
    checked against the teacher's own class names (an ImageNet teacher used without adaptation)."""
    from .data.for_config import subtask_data

    try:
        return subtask_data(cfg), ""
    except DataError as exc:
        if cfg.teacher.adapt.method != "none" or (cfg.teacher.num_classes or 1000) != 1000:
            raise
        import timm.data

        names = list(timm.data.ImageNetInfo().label_descriptions()) + list(timm.data.ImageNetInfo().label_names())
        unknown = [c for c in cfg.subtask.classes if isinstance(c, str) and c not in names]
        if unknown:
            raise DataError(f"subtask.classes {unknown} are not ImageNet class names or synsets "
                            f"({did_you_mean(unknown[0], names).strip()}).",
                            "Use timm's ImageNet names (timm.data.ImageNetInfo().label_descriptions()).") from None
        return None, f"dataset not on this machine ({exc.problem}); classes checked against the teacher's ImageNet head"
