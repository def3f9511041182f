"""Giving a teacher a head over the classes that have labels: which images and classes it may learn from, the
fit on images or on a frozen prefix's cached output, and which head columns hold the subtask. The `teacher` and
`adapt` stages (pipeline/stages/) are the recipes; `ctx` here is anything with config, device, progress and log
(a StageContext)."""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import replace

import torch
from torch import nn

from ..data import View
from ..data.views import as_tensor, augment_batch
from ..errors import ModelError
from ..seeds import seed_for
from .fit import fit_classifier
from .layout import channels_last, channels_last_model
from .predict import accuracy, predict_logits
from .split import split_at


def teacher_view(cfg, model: nn.Module, dataset) -> View:
    """What the teacher expects (timm's data config), overridden by teacher.input."""
    data_cfg = {}
    if hasattr(model, "pretrained_cfg"):
        import timm

        data_cfg = timm.data.resolve_model_data_config(model)
    size = data_cfg.get("input_size", (dataset.channels, dataset.size, dataset.size))
    return View.resolve(cfg.teacher.input, default_size=size[-1], default_channels=size[0],
                        default_mean=data_cfg.get("mean"), default_std=data_cfg.get("std"))


def head_class_names(cfg, num_classes: int, data) -> list[str]:
    if cfg.teacher.source == "train":
        return labelled_classes(data)
    if num_classes == 1000 and cfg.teacher.class_names in (None, "imagenet"):
        import timm.data

        return list(timm.data.ImageNetInfo().label_descriptions())
    return [str(i) for i in range(num_classes)]


def teacher_class_ids(head_names: list[str], data) -> list[int]:
    """Columns of the teacher's head that hold the subtask classes, matched by name (or ImageNet synset)."""
    if len(head_names) == 1000 and not all(n in head_names for n in data.class_names):
        import timm.data

        synsets = list(timm.data.ImageNetInfo().label_names())
        if all(n in synsets for n in data.class_names):
            return [synsets.index(n) for n in data.class_names]
    missing = [n for n in data.class_names if n not in head_names]
    if missing:
        raise ModelError(f"The teacher's head has no class named {', '.join(map(repr, missing))}.",
                         "Adapt the teacher to the dataset's classes (teacher.adapt.method: finetune or linear_probe), "
                         "or name the subtask classes as the teacher's head does.")
    return [head_names.index(n) for n in data.class_names]


def labelled_split(cfg, data):
    """What the teacher may learn its head from: every labelled training image of the dataset (all classes, the
    seeded 80/20 split) -- or, under a label budget (data.labels_per_class or data.labels_file), only the subtask's
    labelled images, with the budget's own small validation split. Labels are head columns (labelled_classes)."""
    if data.few_labels:
        return data.train, data.val
    from ..data.subtask import full_split

    return full_split(data.dataset, cfg.data.val_fraction, cfg.build.seed)


def labelled_classes(data) -> list[str]:
    """The new head's classes: the dataset's, or only the subtask's under a label budget (no other labels exist)."""
    return data.class_names if data.few_labels else list(data.dataset.class_names)


def teacher_arch(cfg) -> str:
    return cfg.teacher.train.arch if cfg.teacher.source == "train" else cfg.teacher.name


def num_outputs(model: nn.Module) -> int:
    classifier = model.get_classifier()
    last = classifier[-1] if isinstance(classifier, nn.Sequential) else classifier
    return last.out_features


def classifier_name(model: nn.Module) -> str:
    classifier = model.get_classifier()
    return next(name for name, child in model.named_children() if child is classifier)


def fit_on_images(ctx, model, view, train, val, settings, description, augment_stream: str) -> dict:
    images, labels = as_tensor(train.images), torch.as_tensor(train.labels)
    augment = ctx.config.data.augment
    generator = torch.Generator().manual_seed(seed_for(ctx.config, augment_stream))

    def train_batch(idx):
        batch = augment_batch(images[idx], generator) if augment else images[idx]
        return view(batch.to(ctx.device)), labels[idx].to(ctx.device)

    def validate():
        return accuracy(predict_logits(model, view, val.images, ctx.device), val.labels)

    return fit_classifier(model, len(train), train_batch, validate, settings, ctx.progress, description)


def fit_tail_on_cached(ctx, model, view, train, val, settings, first_trainable, pool=None, heads: int = 1,
                       test_images=None, copies: int = 1) -> dict:
    """Run the frozen prefix once over the images, then train only the tail on its cached output. The result also
    holds the finished teacher's logits on train + val (+ the unlabelled pool: distillation needs them, and the
    frozen prefix costs the same here as later). With `heads` > 1 the tail is trained that many times (each with
    its own head initialisation and batch order; `model` keeps the first) and every logit is the members' mean;
    `test_images` then get their logits the same way (result["test_logits"]). With `copies` > 1 the tail trains on
    that many views of each training image (the image, then seeded crops and flips), all cached."""
    example = view(as_tensor(train.images[:2]).to(ctx.device))
    prefix, tail = split_at(model, first_trainable, example)
    for p in prefix.parameters():
        p.requires_grad_(False)
    prefix.eval()
    with channels_last_model(prefix):
        cached_train = _cache_features(ctx, prefix, view, train.images, "cache teacher features (train)")
        cached_val = _cache_features(ctx, prefix, view, val.images, "cache teacher features (val)")
        cached_fit = _with_augmented_copies(ctx, prefix, view, train.images, cached_train, copies)
    labels = torch.as_tensor(train.labels).repeat(copies)
    ctx.log(f"  cached {first_trainable} inputs: {tuple(cached_fit.shape)} ({cached_fit.numel() * 4 / 2**20:.0f} MiB)")

    def train_batch(idx):
        return channels_last(cached_fit[idx].to(ctx.device)), labels[idx].to(ctx.device)

    untrained = copy.deepcopy(tail) if heads > 1 else None

    @torch.inference_mode()
    def tail_logits(members: list[nn.Module], cached):
        for member in members:
            member.eval()
        return torch.cat([_mean_logits(members, channels_last(cached[i:i + 512].to(ctx.device)))
                          for i in range(0, len(cached), 512)])

    def fit(member: nn.Module, member_settings, description: str) -> dict:
        with channels_last_model(member):
            return fit_classifier(member, len(cached_fit), train_batch,
                                  lambda: accuracy(tail_logits([member], cached_val), val.labels),
                                  member_settings, ctx.progress, description)

    result = {**fit(tail, settings, f"adapt (from {first_trainable})"), "train_views": len(cached_fit)}
    members = [tail]
    for k in range(1, heads):
        members.append(_fresh_head_copy(untrained, ctx.config, k))
        fit(members[-1], replace(settings, seed=seed_for(ctx.config, f"adapt.heads.{k}")), f"adapt head {k + 1}/{heads}")
    with contextlib.ExitStack() as layouts:      # the tails answer in channels_last, as they trained
        for member in members:
            layouts.enter_context(channels_last_model(member))
        if heads > 1:
            result["heads_val_acc"] = accuracy(tail_logits(members, cached_val), val.labels)
            ctx.log(f"  {heads} heads: validation accuracy of their mean {result['heads_val_acc']:.4f}")
        result["logits"] = torch.cat([tail_logits(members, cached_train), tail_logits(members, cached_val)])
        if pool is not None and len(pool):
            result["logits"] = torch.cat([result["logits"],
                                          _logits_on(ctx, prefix, members, view, pool.images, "unlabelled pool")])
        if test_images is not None:
            result["test_logits"] = _logits_on(ctx, prefix, members, view, test_images, "test split")
    return result


def _with_augmented_copies(ctx, prefix: nn.Module, view: View, images, cached: torch.Tensor, copies: int
                           ) -> torch.Tensor:
    """The cached training images followed by copies - 1 augmented copies of them (stream adapt.copies), each copy
    through the prefix: crops and flips of the raw images, as data.augment makes them, while the prefix stays
    cached."""
    if copies == 1:
        return cached
    generator = torch.Generator().manual_seed(seed_for(ctx.config, "adapt.copies"))
    raw = as_tensor(images)
    views = [cached] + [_cache_features(ctx, prefix, view, augment_batch(raw, generator).numpy(),
                                        f"cache teacher features (augmented copy {k + 1}/{copies - 1})")
                        for k in range(copies - 1)]
    return torch.cat(views)


def _mean_logits(members: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    out = members[0](x).float()
    for member in members[1:]:
        out = out + member(x).float()
    return (out / len(members)).cpu()


def _fresh_head_copy(untrained: nn.Sequential, cfg, k: int) -> nn.Sequential:
    """A copy of the tail as it was before training, except for the new head (every Linear), initialised from
    stream adapt.heads.<k>; the trained blocks start from the same pretrained weights in every member."""
    copy_ = copy.deepcopy(untrained)
    generator = torch.Generator().manual_seed(seed_for(cfg, f"adapt.heads.{k}"))
    for module in copy_.modules():
        if isinstance(module, nn.Linear):       # nn.Linear's own initialisation, drawn from this head's stream
            with torch.no_grad():
                weight = torch.empty(module.weight.shape)
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
                bound = 1 / math.sqrt(module.in_features)
                bias = torch.empty(module.out_features).uniform_(-bound, bound, generator=generator)
                module.weight.copy_(weight)
                if module.bias is not None:
                    module.bias.copy_(bias)
    return copy_


@torch.inference_mode()
def _logits_on(ctx, prefix: nn.Module, members: list[nn.Module], view: View, images, what: str,
               batch: int = 128) -> torch.Tensor:
    """The finished teacher (the members' mean) on more images, prefix and tail chunk by chunk (no cache of the
    prefix's output)."""
    source, out = as_tensor(images), []
    for member in members:
        member.eval()
    with channels_last_model(prefix), ctx.progress.task(f"teacher logits ({what})", len(source)) as bar:
        for start in range(0, len(source), batch):
            x = channels_last(view(source[start:start + batch].to(ctx.device)))
            out.append(_mean_logits(members, channels_last(prefix(x))))
            bar.advance(len(out[-1]))
    return torch.cat(out)


@torch.no_grad()  # not inference_mode: the cache is fed to autograd later
def _cache_features(ctx, prefix: nn.Module, view: View, images, description: str) -> torch.Tensor:
    """float32 (not half): the tail then sees exactly what the whole teacher computes, so the logits saved for
    later stages equal a full forward pass up to float rounding."""
    source, chunks = as_tensor(images), []
    batch = 128           # fastest on the CPU for EfficientNet-Lite0 at 64x64 (128: 1360 img/s, 256: 780 img/s)
    with ctx.progress.task(description, (len(source) + batch - 1) // batch) as bar:
        for start in range(0, len(source), batch):
            chunks.append(prefix(channels_last(view(source[start:start + batch].to(ctx.device)))).contiguous().cpu())
            bar.advance(1)
    return torch.cat(chunks)
