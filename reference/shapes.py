"""The reference data set: procedurally drawn coloured shapes, made on the fly.

Every image is one shape on a dark background, described by three attributes:
its kind, its colour and the quadrant it sits in. 4 x 4 x 4 = 64 classes. A
seeded generator reproduces any batch exactly; nothing is downloaded.
"""
import math

import torch

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow")
POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right")
ATTRIBUTES = {"shape": SHAPES, "colour": COLOURS, "position": POSITIONS}

_RGB = torch.tensor([[0.90, 0.15, 0.12], [0.15, 0.75, 0.20], [0.15, 0.30, 0.95], [0.95, 0.85, 0.15]])
_BACKGROUND = 0.08
_SUPERSAMPLE = 4


def random_labels(count: int, generator: torch.Generator) -> torch.Tensor:
    """[count, 3] long: (shape, colour, position) indices, uniform."""
    return torch.stack([torch.randint(len(v), (count,), generator=generator) for v in ATTRIBUTES.values()], dim=1)


def render(labels: torch.Tensor, generator: torch.Generator, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Images [N, 3, size, size] in [0, 1] for labels [N, 3], with random
    size, jitter, rotation-free placement and slight colour variation."""
    n = labels.shape[0]
    fine = size * _SUPERSAMPLE
    coords = (torch.arange(fine, dtype=torch.float32) + 0.5) / fine          # pixel centres in [0, 1]
    y, x = coords.view(1, fine, 1), coords.view(1, 1, fine)
    quadrant = labels[:, 2]
    centre_x = 0.25 + 0.5 * (quadrant % 2).float() + 0.06 * (torch.rand(n, generator=generator) - 0.5)
    centre_y = 0.25 + 0.5 * (quadrant // 2).float() + 0.06 * (torch.rand(n, generator=generator) - 0.5)
    radius = 0.15 + 0.07 * torch.rand(n, generator=generator)
    cx, cy, r = centre_x.view(n, 1, 1), centre_y.view(n, 1, 1), radius.view(n, 1, 1)
    dx, dy = x - cx, y - cy

    circle = dx ** 2 + dy ** 2 <= r ** 2
    square = torch.maximum(dx.abs(), dy.abs()) <= r * 0.85
    # upward triangle: below the two slanted edges and above the base
    slope = math.tan(math.radians(60))
    triangle = (dy <= r * 0.75) & (dy >= slope * dx.abs() - r)
    arm = r * 0.32
    cross = ((dx.abs() <= arm) & (dy.abs() <= r)) | ((dy.abs() <= arm) & (dx.abs() <= r))
    masks = torch.stack([circle, square, triangle, cross], dim=1).float()   # [N, 4, fine, fine]
    mask = masks.gather(1, labels[:, 0].view(n, 1, 1, 1).expand(n, 1, fine, fine))
    coverage = torch.nn.functional.avg_pool2d(mask, _SUPERSAMPLE)          # anti-aliased [N, 1, size, size]

    colour = _RGB[labels[:, 1]] + 0.05 * (torch.rand(n, 3, generator=generator) - 0.5)
    return (_BACKGROUND + coverage * (colour.view(n, 3, 1, 1) - _BACKGROUND)).clamp(0, 1)


def batch(count: int, generator: torch.Generator, size: int = IMAGE_SIZE):
    labels = random_labels(count, generator)
    return render(labels, generator, size), labels


def describe(labels) -> str:
    return " ".join(values[int(i)] for values, i in zip(ATTRIBUTES.values(), labels))
