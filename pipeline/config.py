"""The build config: YAML -> frozen pydantic models. Every error is reported at once with its key path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from exporters.config import ExportConfig
from quantize.config import QATConfig

from .cache import config_sha256
from .distill.config import DistillConfig, SubspacesConfig
from .errors import ConfigError
from .ood.config import OODConfig
from .registry import did_you_mean
from .release.config import ReleaseConfig
from .schema import OmitNoneOptions, Section
from .search.config import SearchConfig
from .validation.config import ValidateConfig


class BuildConfig(Section):
    """Where the build's cache lives and what every stage runs with. Only seed, threads and the device (as resolved
    on this machine) change results, so only they enter the stage keys (`result_fields`): moving `output`
    elsewhere, or switching on `verify_cache`, reuses every cached stage."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="build name: the folder under output")
    seed: int = Field(0, description="seeds data splits, initialisation, sampling and shuffling")
    output: str = Field("builds", description="cache root; stage outputs go to <output>/<name>/<stage>-<key>/")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available, else cpu")
    threads: int = Field(0, ge=0, description="torch CPU threads for training (0: all cores)")
    verify_cache: bool = Field(
        False, description="on every cache hit, check the sha256 of each file the stage wrote (default: sizes only)")

    def result_fields(self) -> dict:
        """What of this section a stage's result depends on: its cache key holds this, not the whole section."""
        return {"seed": self.seed, "threads": self.threads, "device": resolved_device(self.device)}


# build options that say where the cache is and how a hit is checked: no stage result, digest or manifest holds them
CACHE_ONLY_KEYS = ("output", "verify_cache")


def resolved_device(requested: str) -> str:
    """'auto' as this machine resolves it (a key must not differ between 'auto' and what it means here)."""
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class SpuriousConfig(Section):
    """A shortcut planted in the data (a stress test): a digit glyph in a corner of a fraction of the images. On the
    training and validation images it shows the class index (the shortcut); on the test images a random class index
    (uncorrelated). The teacher's own training/adaptation always sees clean images."""

    fraction: float = Field(0.5, ge=0, le=1, description="share of images that get a marker (exactly round(p * n) per split)")
    corner: Literal["top_left", "top_right", "bottom_left", "bottom_right"] = Field(
        "top_left", description="where the glyph is pasted")
    scale: Optional[int] = Field(None, ge=1, le=16, description="pixels per font dot (None: image side / 28, at least 1: "
                                 "a 7x5-pixel box on 28x28 images)")
    seed: int = Field(0, description="added to build.seed: which images get a marker, and the random test digits")


class DataConfig(OmitNoneOptions):
    # The label-budget keys are left out of the dump while unset: configs without a budget keep their keys.
    omit_when_none = ("spurious", "labels_per_class", "unlabelled", "unlabelled_max_images", "labels_file")

    dataset: str = Field("fashion_mnist", description="fashion_mnist, cifar100 or image_folder (the dataset registry)")
    root: Optional[str] = Field(None, description="image_folder: folder with train/<class>/ and test/<class>/")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="seeded split of the training images used for model selection")
    train_per_class: Optional[int] = Field(None, ge=1, description="cap per class (tiny builds)")
    test_per_class: Optional[int] = Field(None, ge=1, description="cap per class on the test split")
    image_size: Optional[int] = Field(None, ge=8, description="stored size for image_folder datasets")
    augment: bool = Field(False, description="random crop + flip while distilling (the teacher then runs every step)")
    allow_download: bool = Field(False, description="let a dataset source download its files (never by default)")
    spurious: Optional[SpuriousConfig] = Field(
        None, description="stress test: paste a class-correlated marker on training images, a random one on test images")
    labels_per_class: Optional[int] = Field(
        None, description="label budget: labels are kept for this many seeded training images per subtask class "
        "(a quarter of them at most, round(val_fraction x N), hold out for model selection); None: every label")
    unlabelled: Optional[str] = Field(
        None, description="the unlabelled transfer pool distillation also trains on: rest (every other training "
        "image of the dataset, all classes), none, or a folder of images (searched recursively); None: rest "
        "under a label budget, else none")
    unlabelled_max_images: Optional[int] = Field(None, ge=1, description="seeded cap on the unlabelled pool")
    labels_file: Optional[str] = Field(
        None, description="CSV of your labels (header image,label; image: training index, or path under data.root "
        "for image_folder; label: a subtask class): exactly these images are labelled (a seeded part of each class "
        "held out for model selection), the other training images form the pool; instead of labels_per_class")

    @field_validator("labels_per_class")
    @classmethod
    def _at_least_two_labels(cls, v):
        if v is not None and v < 2:
            raise ValueError(f"labels_per_class {v} leaves no labelled image to adapt the teacher on and one to "
                             "validate with; use at least 2 (null keeps every label)")
        return v

    @field_validator("unlabelled")
    @classmethod
    def _pool_given(cls, v):
        if v is not None and not v.strip():
            raise ValueError("unlabelled is empty; use rest, none or the path of a folder of images")
        return v

    @field_validator("labels_file")
    @classmethod
    def _labels_file_given(cls, v):
        if v is not None and not v.strip():
            raise ValueError("labels_file is empty; give the path of your labels CSV, or leave the key out")
        return v

    @model_validator(mode="after")
    def _one_source_of_labels(self):
        if self.labels_file is not None and self.labels_per_class is not None:
            raise ValueError(
                "labels_per_class and labels_file both say which images have labels; keep labels_file to train on "
                "your labels, or labels_per_class for a seeded budget of the dataset's own labels")
        return self

    @property
    def few_labels(self) -> bool:
        """Only some training images have labels: a seeded budget or a labels file."""
        return self.labels_per_class is not None or self.labels_file is not None

    @property
    def has_pool(self) -> bool:
        """Whether distillation gets an unlabelled pool (data.unlabelled, default rest under a label budget)."""
        if self.unlabelled is None:
            return self.few_labels
        return self.unlabelled != "none"


class SubtaskConfig(Section):
    classes: list[Union[str, int]] = Field(min_length=2, description="class names (or ids) of the dataset the device needs")

    @field_validator("classes")
    @classmethod
    def _unique(cls, v):
        if len(set(map(str, v))) != len(v):
            raise ValueError("subtask classes must be distinct")
        return v


class InputSpec(Section):
    """How a model wants to see an image: size, channels, normalisation."""

    size: Optional[int] = Field(None, ge=8, description="square input side in pixels (None: the model's own)")
    channels: Optional[Literal[1, 3]] = Field(None, description="1 grayscale or 3 RGB (None: the model's own)")
    mean: Optional[list[float]] = Field(None, description="per-channel mean after scaling to [0, 1]")
    std: Optional[list[float]] = Field(None, description="per-channel std after scaling to [0, 1]")


class AdaptConfig(OmitNoneOptions):
    omit_when_none = ("keep", "heads", "augment_copies")   # left out while unset: existing configs keep their keys
    method: Literal["none", "linear_probe", "finetune"] = Field(
        "none", description="none: use the pretrained head; linear_probe: new head only; finetune: new head + last stages")
    epochs: int = Field(3, ge=1, description="adaptation epochs (best on validation kept)")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    batch_size: int = Field(128, ge=1, description="adaptation batch size")
    train_from: Optional[str] = Field(
        None, description="finetune: first trainable module; earlier layers stay frozen and their output is cached"
    )
    max_images: Optional[int] = Field(None, ge=1, description="cap on training images used for adaptation")
    keep: Optional[Literal["best", "last"]] = Field(
        None, description="which epoch's weights to keep: best on the labelled validation split (null = best), or the "
        "last one (under a label budget a few dozen validation images pick an epoch by chance)")
    heads: Optional[int] = Field(
        None, ge=2, description="train the tail this many times on the cached prefix, each with its own head "
        "initialisation and batch order; the teacher's answers (its logits table for later stages) are their mean. "
        "Needs train_from or linear_probe")
    augment_copies: Optional[int] = Field(
        None, ge=2, description="fit the tail on this many views of every labelled training image: the image and "
        "seeded random crops (2 px) with horizontal flips, each run once through the frozen prefix and cached; an "
        "epoch passes over all of them. For datasets whose classes survive a mirror image. Needs train_from or "
        "linear_probe")

    @model_validator(mode="after")
    def _cached_prefix_options(self):
        for key, what in (("heads", "trains several tails"), ("augment_copies", "caches augmented copies")):
            if getattr(self, key) is None:
                continue
            if self.method == "finetune" and self.train_from is None:
                raise ValueError(f"teacher.adapt.{key} {what} on the cached output of a frozen prefix, but "
                                 "train_from is null (the whole network is fine-tuned). Set teacher.adapt.train_from "
                                 f"(e.g. blocks.5), or remove {key}")
            if self.method == "none":
                raise ValueError(f"teacher.adapt.{key} needs a new head, but method is none. Set method to finetune "
                                 f"or linear_probe, or remove {key}")
        return self


class TrainTeacherConfig(Section):
    arch: str = Field("cnn_teacher", description="source train: edgesmith or timm architecture trained from scratch")
    epochs: int = Field(3, ge=1, description="training epochs on all dataset classes")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate")
    batch_size: int = Field(128, ge=1, description="training batch size")


class TeacherConfig(Section):
    source: Literal["timm", "checkpoint", "train"] = Field(
        description="timm: pretrained architecture (+ weights); checkpoint: your state_dict; train: from scratch here")
    name: Optional[str] = Field(None, description="timm architecture (source timm/checkpoint)")
    weights: Optional[str] = Field(None, description="file, or package:<module>/<path inside it>")
    weights_format: Literal["timm", "positional"] = Field(
        "timm", description="timm: keys match; positional: map tensors by order with a strict shape check")
    num_classes: Optional[int] = Field(None, ge=1, description="classes of the pretrained head")
    class_names: Optional[str] = Field(None, description="'imagenet' or a text file, one name per line")
    input: InputSpec = InputSpec()
    adapt: AdaptConfig = AdaptConfig()
    train: TrainTeacherConfig = TrainTeacherConfig()


class StudentConfig(Section):
    arch: str = Field(description="edgesmith student (cnn_tiny, cnn_small, cnn_compact, cnn_medium, ...), a CNN by its "
                      "layers (cnn-12-24s2-48s2), any timm model, or `search` (the search section picks it)")
    input: InputSpec = InputSpec()
    pretrained: bool = Field(False, description="start from timm weights in the local cache (never downloaded)")


class DistributedConfig(Section):
    """How a build launched with torchrun / --nproc shares out its work. Not part of the training stages' keys
    (only the release, which records the whole config, hashes it): see docs/distributed.md for what it changes
    numerically."""

    micro_batch: Optional[int] = Field(
        None, ge=1, description="most images one process runs forward/backward at once; its share of a global "
        "batch (distill.batch_size, qat.batch_size) is split into micro-batches whose gradients accumulate "
        "(None: the whole share at once)")
    timeout_min: float = Field(
        120.0, gt=0, description="minutes a process waits at a collective (e.g. while rank 0 runs a stage alone) "
        "before the build fails")


class EdgesmithConfig(Section):
    build: BuildConfig
    data: DataConfig = DataConfig()
    subtask: SubtaskConfig
    teacher: TeacherConfig
    student: StudentConfig
    subspaces: SubspacesConfig = SubspacesConfig()
    distill: DistillConfig = DistillConfig()
    qat: Optional[QATConfig] = None
    export: Optional[ExportConfig] = None
    # "validate" would shadow a pydantic method name, hence the alias.
    validate_: Optional[ValidateConfig] = Field(None, alias="validate")
    release: Optional[ReleaseConfig] = None
    distributed: Optional[DistributedConfig] = None
    ood: Optional[OODConfig] = None  # unknown answer for inputs outside the subtask (pipeline/ood, docs/ood.md)
    search: Optional[SearchConfig] = None  # the student found by a search under budgets (pipeline/search, docs/search.md)

    @model_validator(mode="before")
    @classmethod
    def _search_by_default(cls, raw):
        """`student.arch: search` alone searches with the section's defaults."""
        if isinstance(raw, dict) and isinstance(raw.get("student"), dict) and raw["student"].get("arch") == "search" \
                and raw.get("search") is None:
            return {**raw, "search": {}}
        return raw

    @model_validator(mode="after")
    def _search_picks_the_student(self):
        if self.search is not None and self.student.arch != "search":
            raise ValueError(
                f"the config has a search section but student.arch is '{self.student.arch}'; set student.arch: search "
                "to let the search pick the student, or remove the search section to train this one")
        if self.search is not None and self.student.pretrained:
            raise ValueError("student.pretrained does not apply to searched students (they train from scratch); "
                             "set it to false")
        return self

    @model_validator(mode="after")
    def _search_times_on_a_target(self):
        """search.latency.target names `local` or a validate target (its SSH options live there); an emulated
        CPU's times say nothing of the device's, so they cannot judge max_p99_ms."""
        from .validation.targets import is_emulated

        target = self.search.latency.target if self.search is not None else "local"
        if target == "local":
            return self
        targets = self.validate_.targets if self.validate_ is not None else ["local"]
        if target not in targets:
            raise ValueError(
                f"search.latency.target '{target}' is not one of validate.targets {targets}.{did_you_mean(target, targets)} "
                "Add it to validate.targets (which holds its SSH options in validate.ssh), or time on this machine "
                "with search.latency.target: local")
        if is_emulated(target) and self.search.budgets.max_p99_ms is not None:
            raise ValueError(
                f"search.latency.target '{target}' is an emulated CPU: its times are not the device's, so they "
                "cannot decide search.budgets.max_p99_ms. Time on the real board or on local, or drop max_p99_ms "
                "and bound the candidates by max_macs / max_size_kb (the emulated p99 is still recorded, marked)")
        return self

    @model_validator(mode="after")
    def _no_label_peeking(self):
        ood = self.ood
        if ood is None:
            return self
        if self.data.few_labels and ood.outlier_exposure and ood.mined_outliers is None:
            raise ValueError(
                "ood.outlier_exposure trains on the images known to lie outside the subtask, i.e. on the other "
                "classes' labels, which a label budget (data.labels_per_class or data.labels_file) says you do not "
                "have; add "
                "ood.mined_outliers: {} to train on the pool's outliers found without labels, or set "
                "ood.outlier_exposure: false")
        if ood.mined_outliers is not None and not ood.outlier_exposure:
            raise ValueError("ood.mined_outliers chooses the images outlier exposure trains on, but "
                             "ood.outlier_exposure is false; set it to true, or remove ood.mined_outliers")
        if ood.mined_outliers is not None and not self.data.has_pool:
            raise ValueError("ood.mined_outliers looks for outliers in the unlabelled pool, but this config has none; "
                             "set data.unlabelled (rest, or a folder of images from the device's domain), or remove "
                             "ood.mined_outliers")
        return self

    @model_validator(mode="after")
    def _int8_formats_need_qat(self):
        int8 = self.export.int8_only() if self.export is not None else []
        if int8 and self.qat is None:
            raise ValueError(
                f"export.formats asks for INT8 artifacts ({', '.join(int8)}), but the config has no qat section; add "
                "a `qat:` section (its defaults are fine), or drop onnx_int8 / tflm from export.formats and set "
                "export.tensorrt.precision: fp16")
        return self

    def section(self, name: str) -> Any:
        return getattr(self, "validate_" if name == "validate" else name)

    def dump(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)

    def recorded(self) -> dict:
        """The config as a release manifest records it and its digest hashes it: without the options that only say
        where the cache lives (CACHE_ONLY_KEYS), so that the same build from another folder is the same record."""
        raw = self.dump()
        raw["build"] = {k: v for k, v in raw["build"].items() if k not in CACHE_ONLY_KEYS}
        return raw

    def digest(self, sections: Optional[Iterable[str]] = None) -> str:
        """sha256 of the recorded config (the manifest's config_sha256), or of the named sections only."""
        return config_sha256(self.recorded(), sections)


# The config's sections by their YAML names; the optional ones (left out: None) switch their stages off.
SECTIONS = tuple(f.alias or name for name, f in EdgesmithConfig.model_fields.items())
OPTIONAL_SECTIONS = tuple(f.alias or name for name, f in EdgesmithConfig.model_fields.items()
                          if not f.is_required() and f.default is None)


# Keys that were taken out because no measurement showed them helping. An old config that sets one is told why
# and what to do, instead of "unknown key".
RETIRED_KEYS = {
    "data.views": "the view bank (K fixed augmented views per image) cost about 4 points of accuracy at 50 labels "
                  "per class, where it was measured. Remove the key; data.augment: true augments every step.",
    "distill.layer_positions": "sampling SubDistill's loss at fewer positions did not make a step measurably "
                               "faster. Remove the key; distill.layer_every is the setting that brings SubDistill "
                               "close to KD's step cost.",
    "distill.cache_teacher": "the frozen teacher's outputs are always computed once when the training images do not "
                             "change (data.augment: false) and on every step when they do. Remove the key.",
    "subspaces.basis": "the alternative bases (pca, prca, random) were ablations that no build result favoured; "
                       "the subspaces stage always estimates SubDistill's relevant subspace. Remove the key.",
}


def _fields_at(model: type, loc: tuple) -> list[str]:
    """Names of the fields valid at a key path, for did-you-mean on unknown keys."""
    annotation = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not hasattr(model, "model_fields"):     # a list of tagged sections: the part names the tag
            model = _tagged_sections(annotation).get(part, model)
            continue
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        if field is None:
            break
        annotation, model = field.annotation, _section_type(field.annotation)
    return [f.alias or n for n, f in getattr(model, "model_fields", {}).items()]


def _tagged_sections(annotation: Any) -> dict[str, type]:
    """{tag: section} of the sections inside a (list of) discriminated union, tagged by their Literal field."""
    import typing

    found, stack = {}, [annotation]
    while stack:
        arg = stack.pop()
        if isinstance(arg, type) and issubclass(arg, Section):
            tags = [typing.get_args(f.annotation)[0] for f in arg.model_fields.values()
                    if typing.get_origin(f.annotation) is Literal and len(typing.get_args(f.annotation)) == 1]
            if tags:
                found[str(tags[0])] = arg
        else:
            stack.extend(typing.get_args(arg))
    return found


def _section_type(annotation: Any) -> Any:
    import typing

    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, Section):
            return arg
        for inner in typing.get_args(arg):
            if isinstance(inner, type) and issubclass(inner, Section):
                return inner
    return annotation


def _describe(err: dict) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-after")))
    path = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden" and path in RETIRED_KEYS:
        return f"{path} was removed: {RETIRED_KEYS[path]}"
    if err["type"] == "extra_forbidden":
        valid = _fields_at(EdgesmithConfig, loc[:-1])
        return f"{path}: unknown key.{did_you_mean(str(loc[-1]), valid)} Valid keys here: {', '.join(valid)}."
    if err["type"] == "missing":
        return f"{path}: required key is missing."
    if not loc:   # a check across sections: its input is the whole config, not worth echoing
        return f"{path}: {err['msg'].removeprefix('Value error, ')}."
    return f"{path}: {err['msg']} (got {err.get('input')!r})."


def parse_config(raw: Any, source: str = "<config>") -> EdgesmithConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a YAML mapping of sections, not {type(raw).__name__}.",
                          "Start from configs/fashion_tops.yaml.")
    try:
        return EdgesmithConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        raise ConfigError(
            f"{source} has {len(lines)} problem{'s' * (len(lines) > 1)}:\n  - " + "\n  - ".join(lines),
            "\nFix these keys (docs/config.md lists every key) and run `edgesmith check` again.",
        ) from None


def config_with(base: str | os.PathLike | EdgesmithConfig, overrides: dict[str, Any] | None = None,
                remove: tuple[str, ...] = ()) -> EdgesmithConfig:
    """A config file (or config) with dotted-key overrides, e.g. {"distill.method": "subdistill", "data.labels_per_class":
    50}, and whole sections removed (their stages then leave the chain): how benchmarks and tools vary a build."""
    if not isinstance(base, EdgesmithConfig):
        return load_config(base, overrides, remove)
    raw = apply_overrides(base.dump(), overrides or {}, remove)
    return parse_config(raw, f"{base.build.name} (with overrides)")


def apply_overrides(raw: dict, overrides: dict[str, Any], remove: tuple[str, ...] = ()) -> dict:
    """Drop whole sections from a raw config mapping, then set dotted keys (an absent or disabled section starts
    empty, so an override can switch a dropped section back on)."""
    for section in remove:
        raw.pop(section, None)
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[leaf] = value
    return raw


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--set key=value` arguments -> {dotted key: value}; values are read as YAML (4, 0.5, null, [a, b], text)."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
            raise ConfigError(f"--set {pair!r} is not of the form section.key=value.",
                              "Write it like --set distill.epochs=4 (repeat --set for each key).")
        try:
            overrides[key.strip()] = yaml.safe_load(text) if text.strip() else text
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {pair!r}: the value is not valid YAML ({exc.problem}).",
                              "Quote text values, e.g. --set 'build.name=\"my build\"'.") from None
    return overrides


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None,
                remove: tuple[str, ...] = ()) -> EdgesmithConfig:
    """Read and validate a YAML config; `overrides` ({dotted key: value}, e.g. from --set) are applied to the file's
    mapping first and validated with it."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a config file.",
                          "Pass the path of a YAML config inside it, e.g. configs/fashion_tops.yaml.")
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist.",
                          "Pass the path of a YAML config, e.g. configs/fashion_tops.yaml.")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not a text file (byte {exc.start} is not UTF-8): it cannot be a YAML config.",
                          "Pass the YAML config itself, saved as UTF-8 text.") from None
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read ({exc.strerror or exc}).",
                          "Check the file's permissions, or pass another config.") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}", "Fix the YAML syntax at the line shown.") from None
    if not (overrides or remove) or not isinstance(raw, dict):
        return parse_config(raw, str(path))
    return parse_config(apply_overrides(raw, overrides or {}, remove), f"{path} (with {_shown(overrides)})")


def _shown(overrides: dict[str, Any] | None) -> str:
    return " ".join(f"{k}={v}" for k, v in (overrides or {}).items()) or "(sections removed)"
