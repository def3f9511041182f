"""Weak and strong views of a raw uint8 batch (N x C x H x W) for learning from unlabelled images, batched on
tensors on whatever device the batch lives on; random draws come from a CPU generator, so a seed gives the same
views on every device.

- weak: horizontal flip (p = 0.5) and a shift of up to an eighth of the side (zero fill), FixMatch's weak view;
- strong: the weak view's geometry plus RandAugment-style ops (Cubuk et al. 2020, with a random magnitude per
  image and op as in FixMatch): each image gets `ops` ops drawn from OPS, then cutout (a square of up to half the
  side, filled grey). Every op acts per channel, so it means the same at 28 px grayscale and for RGB.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
PHOTOMETRIC = ("identity", "autocontrast", "brightness", "contrast", "equalize", "posterize", "solarize",
               "sharpness")
OPS = GEOMETRIC + PHOTOMETRIC


def _draw(shape, generator: torch.Generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator).to(device)


def _signed(n: int, generator: torch.Generator, device) -> torch.Tensor:
    """Uniform in [-1, 1] per image."""
    return _draw(n, generator, device) * 2 - 1


def _flip_shift(n: int, side: int, generator: torch.Generator, device, shift: float) -> torch.Tensor:
    """Affine matrices (n x 2 x 3, normalised coordinates) of a random flip and an integer shift."""
    theta = torch.zeros(n, 2, 3, device=device)
    flip = _draw(n, generator, device) < 0.5
    theta[:, 0, 0] = torch.where(flip, -1.0, 1.0)
    theta[:, 1, 1] = 1.0
    limit = int(round(shift * side))
    pixels = torch.randint(-limit, limit + 1, (n, 2), generator=generator).to(device).float()
    theta[:, :, 2] = pixels * 2 / side
    return theta


def _warp(x: torch.Tensor, theta: torch.Tensor, mode: str) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def weak_view(images: torch.Tensor, generator: torch.Generator, shift: float = 0.125) -> torch.Tensor:
    """Flip and shift (nearest sampling: whole pixels move, values stay)."""
    theta = _flip_shift(len(images), images.shape[-1], generator, images.device, shift)
    return _warp(images.float(), theta, "nearest").round().clamp(0, 255).to(torch.uint8)


def _geometry(chosen: dict[str, torch.Tensor], n: int, generator: torch.Generator, device) -> torch.Tensor:
    """The chosen geometric ops of each image as one 3 x 3 matrix (identity where none was chosen)."""
    m = torch.eye(3, device=device).repeat(n, 1, 1)
    angle = _signed(n, generator, device) * math.radians(30) * chosen["rotate"]
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.eye(3, device=device).repeat(n, 1, 1)
    rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1] = cos, -sin, sin, cos
    shear = torch.eye(3, device=device).repeat(n, 1, 1)
    shear[:, 0, 1] = _signed(n, generator, device) * 0.3 * chosen["shear_x"]
    shear[:, 1, 0] = _signed(n, generator, device) * 0.3 * chosen["shear_y"]
    move = torch.eye(3, device=device).repeat(n, 1, 1)
    move[:, 0, 2] = _signed(n, generator, device) * 0.6 * chosen["translate_x"]   # 0.3 of the side
    move[:, 1, 2] = _signed(n, generator, device) * 0.6 * chosen["translate_y"]
    return m @ move @ rot @ shear


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: b + factor (a - b); factor 1 keeps a."""
    return b + _per_image(factor) * (a - b)


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    return torch.where(hi > lo, (x - lo) * 255 / (hi - lo).clamp_min(1e-6), x)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation per image and channel: each value goes to its rank (the fraction of pixels at or
    below it), the darkest value to 0."""
    n, c, h, w = x.shape
    flat = x.reshape(n * c, h * w).contiguous()
    ordered = flat.sort(1).values
    cdf = torch.searchsorted(ordered, flat, right=True).float() / (h * w)
    lowest = torch.searchsorted(ordered, ordered[:, :1].contiguous(), right=True).float() / (h * w)
    out = (cdf - lowest) / (1 - lowest).clamp_min(1e-6) * 255
    return out.view(n, c, h, w)


def sharpen(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's Sharpness: blend with the image smoothed by its 3 x 3 kernel (factor 0 smooth, 1 unchanged)."""
    c = x.shape[1]
    kernel = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]], device=x.device) / 13
    smooth = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel.expand(c, 1, 3, 3), groups=c)
    return _blend(x, smooth, factor)


def _photometric(x: torch.Tensor, op: str, magnitude: torch.Tensor) -> torch.Tensor:
    """One op on the whole batch, magnitude in [0, 1] per image (the caller keeps it where it was chosen)."""
    factor = 1 + (magnitude * 2 - 1) * 0.9           # ImageEnhance factors in [0.1, 1.9]
    if op == "identity":
        return x
    if op == "autocontrast":
        return autocontrast(x)
    if op == "brightness":
        return x * _per_image(factor)
    if op == "contrast":
        return _blend(x, x.mean((1, 2, 3), keepdim=True), factor)
    if op == "equalize":
        return equalize(x)
    if op == "posterize":                             # keep 4 to 8 bits
        step = _per_image(2.0 ** torch.round(magnitude * 4))
        return torch.floor(x / step) * step
    if op == "solarize":                              # invert every value above a threshold in [0, 256]
        return torch.where(x >= _per_image(256 * (1 - magnitude)), 255 - x, x)
    if op == "sharpness":
        return sharpen(x, factor)
    raise ValueError(f"unknown op {op!r}")


def cutout(x: torch.Tensor, generator: torch.Generator, max_fraction: float = 0.5, fill: float = 127.0
           ) -> torch.Tensor:
    """A square of up to max_fraction of the side, at a random centre (clipped at the border), filled grey."""
    n, _, h, w = x.shape
    size = (_draw(n, generator, x.device) * max_fraction * min(h, w)).round()
    cy, cx = _draw(n, generator, x.device) * h, _draw(n, generator, x.device) * w
    rows = torch.arange(h, device=x.device).view(1, h, 1).float()
    cols = torch.arange(w, device=x.device).view(1, 1, w).float()
    half = _per_image(size).squeeze(1) / 2
    inside = ((rows - cy.view(-1, 1, 1)).abs() < half) & ((cols - cx.view(-1, 1, 1)).abs() < half)
    return torch.where(inside.unsqueeze(1), torch.full_like(x, fill), x)


def strong_view(images: torch.Tensor, generator: torch.Generator, ops: int = 2, shift: float = 0.125) -> torch.Tensor:
    """RandAugment-style: `ops` ops per image drawn from OPS (with replacement), random magnitudes, then cutout."""
    n, device = len(images), images.device
    picks = torch.randint(len(OPS), (n, ops), generator=generator).to(device)
    chosen = {op: (picks == i).any(1).float() for i, op in enumerate(OPS)}
    geometry = _geometry(chosen, n, generator, device)
    flip_shift = torch.cat([_flip_shift(n, images.shape[-1], generator, device, shift),
                            torch.tensor([0.0, 0, 1], device=device).expand(n, 1, 3)], 1)
    x = _warp(images.float(), (flip_shift @ geometry)[:, :2], "bilinear")
    for op in PHOTOMETRIC[1:]:
        magnitude = _draw(n, generator, device)
        x = torch.where(_per_image(chosen[op]) > 0, _photometric(x, op, magnitude).clamp(0, 255), x)
    return cutout(x, generator).round().clamp(0, 255).to(torch.uint8)
