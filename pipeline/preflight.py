"""Checks run before anything is built: names resolve, files exist, the data holds the subtask."""

from __future__ import annotations

import functools
from pathlib import Path

from .errors import ConfigError, DataError, ModelError
from .registry import did_you_mean


def check_build(cfg, until: str | None = None) -> list[str]:
    """What `check` and `build` both run before any stage: names resolve, qat.keep_fp32 names layers of the
    student, and the build folder can be written (or is a read-only cache that holds every stage). Raises the first
    problem; returns notes (e.g. the read-only cache). `until`: the build stops after that stage, so what only
    later stages need on this machine (the export formats' extras) is not asked for."""
    check_names(cfg, exports=_runs("export", until))
    check_layer_pairs(cfg)
    check_keep_fp32(cfg)
    note = check_output(cfg)
    return [note] if note else []


def check_keep_fp32(cfg) -> None:
    """qat.keep_fp32 layer names against the student's Conv/Linear layers: the architecture alone (no weights, no
    data), so a typo fails before the teacher, adapt and distill stages run rather than at qat."""
    qat = cfg.section("qat")
    if qat is None or not qat.keep_fp32 or qat.keep_fp32 == ["auto"]:
        return
    if cfg.search is not None:
        raise ConfigError("qat.keep_fp32 names layers of one architecture, but the search picks the student.",
                          "Use qat.keep_fp32: [auto], or fix the student (student.arch) and remove the search section.")
    from quantize.precision import check_layer_names

    check_layer_names(_architecture(cfg.student.arch, len(cfg.subtask.classes), cfg.student.input.channels),
                      list(qat.keep_fp32))


def check_layer_pairs(cfg) -> None:
    """Explicit distill.layers name modules of the teacher and student architectures (built without weights), so a
    typo fails before the teacher is adapted rather than when distillation starts."""
    from .distill.features import check_layer_names
    from .distill.methods import METHODS

    layers = cfg.distill.layers
    if layers == "auto" or not METHODS.get(cfg.distill.method).uses_layers:
        return
    if cfg.search is not None:
        raise ConfigError("distill.layers names layers of one student architecture, but the search picks the student.",
                          "Use distill.layers: auto with a search, or fix the student and remove the search section.")
    teacher_arch = cfg.teacher.train.arch if cfg.teacher.source == "train" else cfg.teacher.name
    if not teacher_arch:
        return                 # no architecture to check against: the teacher source reports that itself
    teacher = _architecture(teacher_arch, cfg.teacher.num_classes or 1000, cfg.teacher.input.channels)
    check_layer_names(teacher, _architecture(cfg.student.arch, len(cfg.subtask.classes), cfg.student.input.channels),
                      layers)


@functools.lru_cache(maxsize=4)
def _architecture(arch: str, classes: int, channels: int | None):
    """A model of `arch` without weights, for checking layer names (which do not depend on the head's width or the
    input channels); built once per architecture for all the checks."""
    from .models.registry import create_model

    return create_model(arch, max(2, classes), channels or 3)


def check_output(cfg) -> str:
    """The build folder (build.output/build.name) can be created and written; nothing is created to find out.
    A folder that cannot be written is fine only if it already holds every stage of this config (a read-only
    cache, reused without the lock): then a note says so; otherwise the CacheError names the folder and the fix."""
    from .cache import BuildCache

    cache = BuildCache(Path(cfg.build.output) / cfg.build.name)
    problem = cache.problem()
    if problem is None:
        return ""
    if not cache.entries():
        raise problem
    from .runner import Build

    build = Build(cfg)
    build.read_only(build.plan())           # raises when a stage would have to run
    return f"every stage is cached and the cache is read-only: build reuses them without the lock ({problem.problem})"


def _runs(stage: str, until: str | None) -> bool:
    """Whether a build that stops after `until` reaches `stage` (an unknown `until` is the runner's to report)."""
    from .stages import CHAIN

    order = [s.name for s in CHAIN]
    return until not in order or order.index(until) >= order.index(stage)


def check_names(cfg, exports: bool = True) -> None:
    """Architecture, method and teacher names, and (`exports`: the build reaches the export stage) the extras the
    export formats need; raises the first problem (an unknown name with the valid ones)."""
    from exporters.mobile import check_mobile_extra

    from .distill.methods import METHODS
    from .models.registry import ARCHS

    if cfg.export is not None and exports:
        check_mobile_extra(cfg.export.formats)  # installed packages: a fact of this machine, not of the config
        if "ethos_u" in cfg.export.formats:
            from exporters.ethos_u import check_ini

            check_ini(cfg.export.ethos_u)  # the Vela .ini and the system configs and memory modes it must hold

    METHODS.get(cfg.distill.method)
    _check_arch(cfg.student.arch, ARCHS.names())
    if cfg.search is not None:
        from .search.space import check_families
        from .search.study import check_mcu_extra, check_optuna

        check_optuna()
        check_mcu_extra(cfg.search)
        check_families(cfg.search.families)
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
    from .models.cnn import parse_cnn_name

    if arch in own or arch == "search" or parse_cnn_name(arch) is not None:
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
        # A labels file names the dataset's images: without the dataset (or with a bad file) there is no fallback.
        if cfg.teacher.adapt.method != "none" or (cfg.teacher.num_classes or 1000) != 1000 or cfg.data.labels_file:
            raise
        import timm.data

        names = list(timm.data.ImageNetInfo().label_descriptions()) + list(timm.data.ImageNetInfo().label_names())
        unknown = [c for c in cfg.subtask.classes if isinstance(c, str) and c not in names]
        if unknown:
            raise DataError(f"subtask.classes {unknown} are not ImageNet class names or synsets "
                            f"({did_you_mean(unknown[0], names).strip()}).",
                            "Use timm's ImageNet names (timm.data.ImageNetInfo().label_descriptions()).") from None
        return None, f"dataset not on this machine ({exc.problem}); classes checked against the teacher's ImageNet head"
