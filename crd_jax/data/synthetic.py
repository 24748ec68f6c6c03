"""A built-in dataset of brain-like subjects with label maps, generated from a seed (no files).

In the spirit of SynthMorph (Hoffmann et al. 2022), but built as a *population* so that subject-to-subject
registration is meaningful and Dice is informative:

1. A template label map: a random ellipsoidal "head" whose interior is split into ``num_labels``
   structures by the argmax of smoothed Gaussian noise fields (smooth, blob-like regions).
2. Each subject: the template warped by its own random smooth diffeomorphism (a smoothed random
   stationary velocity field integrated by scaling and squaring), so two subjects differ by a deformation
   of up to about twice ``max_displacement`` voxels.
3. Its image: a per-structure mean intensity (shared contrast, per-subject jitter), a smooth
   multiplicative bias field, light blur and Gaussian noise, scaled to [0, 1].

Everything is numpy/scipy with ``np.random.default_rng([seed, ...])``: the same seed gives the same
subjects on every machine, and subject ``i`` does not depend on how many subjects are generated. 2-D and
3-D, any size.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from crd_jax.data.dataset import _LRU
from crd_jax.data.io import Volume
from crd_jax.data.preprocess import Placement, place


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    shape: Tuple[int, ...] = (32, 32, 32)
    num_subjects: int = 40
    num_labels: int = 16
    max_displacement: float = 3.0  # voxels, per subject relative to the template
    smoothness: float = 0.15  # velocity smoothing sigma as a fraction of the image side
    label_smoothness: float = 0.09  # label noise smoothing sigma as a fraction of the image side
    noise: float = 0.03
    bias: float = 0.2
    seed: int = 0


def _grid(shape) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), axis=0)


def _smooth_noise(rng, channels: int, shape, sigma: float) -> np.ndarray:
    noise = rng.standard_normal((channels, *shape))
    return ndimage.gaussian_filter(noise, sigma=(0,) + (sigma,) * len(shape), mode="reflect")


def _warp(volume: np.ndarray, disp: np.ndarray, order: int) -> np.ndarray:
    """``volume(x + disp(x))`` with ``disp`` as ``(ndim, *shape)``, border mode."""
    return ndimage.map_coordinates(volume, _grid(volume.shape) + disp, order=order, mode="nearest")


def integrate(velocity: np.ndarray, steps: int = 7) -> np.ndarray:
    """Scaling and squaring in numpy, ``velocity`` as ``(ndim, *shape)``."""
    u = velocity / 2.0**steps
    for _ in range(steps):
        u = u + np.stack([_warp(c, u, order=1) for c in u])
    return u


def template_labels(cfg: SyntheticConfig) -> np.ndarray:
    """The population's template label map (0 outside the head)."""
    rng = np.random.default_rng([cfg.seed, 0])
    shape = cfg.shape
    g = _grid(shape)
    centre = (np.asarray(shape, np.float64) - 1) / 2
    radii = np.asarray(shape, np.float64) * 0.42
    r = np.sqrt(sum(((g[a] - centre[a]) / radii[a]) ** 2 for a in range(len(shape))))
    # A wobbly outline, so the head boundary itself carries shape information.
    outline = 1.0 + 0.08 * _smooth_noise(rng, 1, shape, max(shape) * 0.15)[0] / 0.05
    head = r < np.clip(outline, 0.85, 1.1)
    fields = _smooth_noise(rng, cfg.num_labels, shape, max(shape) * cfg.label_smoothness)
    labels = 1 + np.argmax(fields, axis=0)
    return np.where(head, labels, 0).astype(np.int32)


def _deformation(cfg: SyntheticConfig, rng) -> np.ndarray:
    ndim = len(cfg.shape)
    v = _smooth_noise(rng, ndim, cfg.shape, max(cfg.shape) * cfg.smoothness)
    v *= cfg.max_displacement / max(np.abs(v).max(), 1e-8)
    return integrate(v)


def make_subject(cfg: SyntheticConfig, index: int) -> Tuple[np.ndarray, np.ndarray]:
    """Image ``(*shape)`` float32 in [0, 1] and labels ``(*shape)`` int32 of subject ``index``."""
    template = template_labels(cfg)
    contrast = np.random.default_rng([cfg.seed, 1]).uniform(0.15, 1.0, size=cfg.num_labels + 1)
    contrast[0] = 0.0
    rng = np.random.default_rng([cfg.seed, 2, index])
    disp = _deformation(cfg, rng)
    labels = _warp(template, disp, order=0).astype(np.int32)
    means = np.clip(contrast + rng.normal(0, 0.03, size=contrast.shape), 0, 1)
    means[0] = 0.0
    image = means[labels]
    image = ndimage.gaussian_filter(image, 0.5)
    bias = np.exp(cfg.bias * _smooth_noise(rng, 1, cfg.shape, max(cfg.shape) * 0.3)[0] / 0.05 * 0.1)
    image = image * bias + rng.normal(0, cfg.noise, size=image.shape) * (labels > 0)
    image = np.clip(image, 0, None)
    image = image / max(float(image.max()), 1e-8)
    return image.astype(np.float32), labels


class SyntheticDataset:
    """Subjects ``offset .. offset + count - 1`` of a synthetic population (same interface as
    :class:`~crd_jax.data.dataset.VolumeDataset`); disjoint offsets give disjoint splits."""

    def __init__(self, cfg: SyntheticConfig, offset: int = 0, count: Optional[int] = None, cache_size: int = 256):
        self.cfg = cfg
        self.offset = offset
        self.count = cfg.num_subjects - offset if count is None else count
        if self.count <= 0:
            raise ValueError("synthetic split is empty")
        self.shape = tuple(cfg.shape)
        self.ndim = len(self.shape)
        self.placement: Placement = place(self.shape, self.shape)
        self._cache = _LRU(cache_size)

    def __len__(self) -> int:
        return self.count

    @property
    def ids(self) -> List[str]:
        return [f"synth{self.offset + i:04d}" for i in range(self.count)]

    has_labels = True

    def _subject(self, i: int):
        if not 0 <= i < self.count:
            raise IndexError(i)
        return self._cache.get(i, lambda: make_subject(self.cfg, self.offset + i))

    def image(self, i: int) -> np.ndarray:
        return self._subject(i)[0]

    def labels(self, i: int) -> np.ndarray:
        return self._subject(i)[1]

    def volume(self, i: int) -> Volume:
        return Volume(self.image(i), np.eye(4), None, self.ids[i])

    def validate(self) -> None:
        return None


def labels_of(cfg: SyntheticConfig) -> Sequence[int]:
    return list(range(1, cfg.num_labels + 1))
