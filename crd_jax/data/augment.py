"""Random B-spline deformations of the moving image, applied to training pairs (the authors' code augments
every step this way; the paper does not mention it).

A displacement field is a cubic B-spline over a control grid with one control point every ``spacing``
voxels (plus one beyond each border), control-point displacements drawn i.i.d. ``N(0, sigma^2)`` voxels;
the moving image is resampled through it (linear), its label map too (nearest). The field is evaluated
separably: along each axis the fine samples are a fixed matrix of B-spline weights times the control
values, so one field costs three small matrix products.

Everything is numpy with ``np.random.default_rng([seed, step, slot, ...])``: augmentation is a pure
function of the training step like the pairs themselves, so a resumed stage sees the same images.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

KINDS = ("none", "bspline")


@dataclasses.dataclass(frozen=True)
class Augment:
    """``kind``: ``none`` or ``bspline``; ``spacing``: voxels between control points; ``sigma``: standard
    deviation of a control point's displacement, in voxels."""

    kind: str = "none"
    spacing: float = 8.0
    sigma: float = 2.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"data.augment.kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.kind != "none" and (self.spacing < 1 or self.sigma < 0):
            raise ValueError(f"data.augment: spacing must be >= 1 voxel and sigma >= 0 (got {self.spacing}, {self.sigma})")

    @property
    def active(self) -> bool:
        return self.kind != "none" and self.sigma > 0


def cubic_bspline(t: np.ndarray) -> np.ndarray:
    """The centred cubic B-spline ``B3(t)`` (support ``|t| < 2``, integral 1)."""
    a = np.abs(np.asarray(t, np.float64))
    return np.where(a < 1, 2 / 3 - a**2 + a**3 / 2, np.where(a < 2, (2 - a) ** 3 / 6, 0.0))


def control_points(size: int, spacing: float) -> int:
    """Control points along an axis of ``size`` voxels: the grid covers ``[-spacing, size - 1 + spacing]``."""
    return int(np.ceil((size - 1) / spacing)) + 3


def basis_matrix(size: int, spacing: float) -> np.ndarray:
    """``W[i, k] = B3(i / spacing + 1 - k)``: fine sample ``i`` from control point ``k`` (control point ``k``
    sits at voxel ``(k - 1) * spacing``)."""
    k = np.arange(control_points(size, spacing))
    i = np.arange(size)[:, None]
    return cubic_bspline(i / spacing + 1 - k[None, :]).astype(np.float32)


def bspline_field(coefficients: np.ndarray, shape: Sequence[int], spacing: float) -> np.ndarray:
    """The displacement ``(*shape, d)`` of control-point displacements ``coefficients (*grid, d)``."""
    field = coefficients.astype(np.float32)
    for axis, size in enumerate(shape):
        w = basis_matrix(size, spacing)
        field = np.moveaxis(np.tensordot(w, field, axes=([1], [axis])), 0, axis)
    return field


def random_field(rng: np.random.Generator, shape: Sequence[int], augment: Augment) -> np.ndarray:
    grid = tuple(control_points(s, augment.spacing) for s in shape)
    coefficients = rng.normal(0.0, augment.sigma, size=grid + (len(shape),))
    return bspline_field(coefficients, shape, augment.spacing)


def resample(volume: np.ndarray, disp: np.ndarray, order: int) -> np.ndarray:
    """``volume(x + disp(x))`` (voxel units, border values repeated): ``order`` 1 for images, 0 for labels."""
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in volume.shape], indexing="ij")
    coords = [g + disp[..., a] for a, g in enumerate(grid)]
    return ndimage.map_coordinates(volume, coords, order=order, mode="nearest").astype(volume.dtype, copy=False)


def deform(
    rng: np.random.Generator, image: np.ndarray, labels: Optional[np.ndarray], augment: Augment
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """The image (and its label map) through one random B-spline deformation."""
    if not augment.active:
        return image, labels
    disp = random_field(rng, image.shape, augment)
    return resample(image, disp, 1), (None if labels is None else resample(labels, disp, 0))
