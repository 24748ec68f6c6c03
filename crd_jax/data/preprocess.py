"""Preprocessing: intensity normalisation, optional resampling, and pad/crop to a shape the network takes.

A U-Net with ``L`` stride-2 levels run on inputs downsampled by ``n = 2^k`` needs every side divisible by
``2^(L + k)``. :func:`place` puts a volume on such a canvas (centred, zero padding, or a centred crop when
the requested shape is smaller) and returns a :class:`Placement` that maps any output on the canvas back
to the original grid exactly (:meth:`Placement.restore`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import numpy as np


def normalize_params(image: np.ndarray, mode: str = "minmax", low: float = 0.5, high: float = 99.5) -> Tuple[float, ...]:
    """``(clip_lo, clip_hi, lo, hi)`` of :func:`normalize` for ``image``: clip to ``[clip_lo, clip_hi]``, then
    map ``[lo, hi]`` to [0, 1] (``hi <= lo``: a constant image, all zeros). Computed without copying the
    image except for ``percentile`` (which sorts its nonzero voxels)."""
    image = np.asarray(image)
    if mode == "none":
        return (-np.inf, np.inf, 0.0, 1.0)
    if mode == "percentile":
        values = image[image != 0]
        values = values if values.size else image
        lo, hi = (float(v) for v in np.percentile(values, [low, high]))
        return (lo, hi, lo, hi) if hi > lo else (lo, hi, lo, lo)
    if mode != "minmax":
        raise ValueError(f"unknown normalisation {mode!r} (none, minmax, percentile)")
    lo, hi = float(image.min()), float(image.max())
    return (-np.inf, np.inf, lo, hi)


def apply_normalize(image: np.ndarray, params: Sequence[float]) -> np.ndarray:
    """``image`` clipped and scaled by :func:`normalize_params`, float32. Clipping aside, this is an affine
    map, so it commutes with linear resampling (whose weights sum to one): the statistics may come from
    the full-resolution image and the map be applied after downsampling."""
    clip_lo, clip_hi, lo, hi = params
    image = np.asarray(image, np.float32)
    if hi <= lo:
        return np.zeros_like(image)
    if np.isfinite(clip_lo) or np.isfinite(clip_hi):
        image = np.clip(image, clip_lo, clip_hi)
    if (lo, hi) == (0.0, 1.0):
        return image
    if hi - lo > float(np.finfo(np.float32).max):  # a range beyond float32 (values near +-3.4e38)
        return ((image.astype(np.float64) - lo) / (hi - lo)).astype(np.float32)
    return ((image - np.float32(lo)) * np.float32(1.0 / (hi - lo))).astype(np.float32, copy=False)


def normalize(image: np.ndarray, mode: str = "minmax", low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """``none``: unchanged; ``minmax``: to [0, 1]; ``percentile``: clip to the ``low``/``high`` percentiles
    of the nonzero voxels, then to [0, 1]. Constant images map to zeros."""
    return apply_normalize(image, normalize_params(image, mode, low, high))


def resample(volume: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """Resamples to ``shape`` with half-pixel centres (the project's convention): linear for images
    (``order=1``), nearest for label maps (``order=0``)."""
    from scipy import ndimage  # here, not at import: it costs ~0.25 s of every command's start

    shape = tuple(int(s) for s in shape)
    if tuple(volume.shape) == shape:
        return volume
    zoom = [t / s for t, s in zip(shape, volume.shape)]
    out = ndimage.zoom(volume, zoom, order=order, grid_mode=True, mode="nearest")
    return out.astype(volume.dtype)


def padded_shape(shape: Sequence[int], multiple: int) -> Tuple[int, ...]:
    """The smallest shape >= ``shape`` with every side a multiple of ``multiple``."""
    return tuple(int(-(-s // multiple) * multiple) for s in shape)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a volume of ``source_shape`` sits on a canvas of ``canvas_shape``.

    ``offset[a]`` is the canvas index of source index 0 along axis ``a``: positive means padding, negative
    means the source was cropped.
    """

    source_shape: Tuple[int, ...]
    canvas_shape: Tuple[int, ...]
    offset: Tuple[int, ...]

    def _windows(self):
        src, dst = [], []
        for n, m, o in zip(self.source_shape, self.canvas_shape, self.offset):
            s0, d0 = max(0, -o), max(0, o)
            length = min(n - s0, m - d0)
            src.append(slice(s0, s0 + length))
            dst.append(slice(d0, d0 + length))
        return tuple(src), tuple(dst)

    def apply(self, volume: np.ndarray, fill: float = 0) -> np.ndarray:
        """Source ``(*source_shape, ...)`` -> canvas ``(*canvas_shape, ...)`` (extra trailing axes kept)."""
        volume = np.asarray(volume)
        out = np.full(self.canvas_shape + volume.shape[len(self.source_shape) :], fill, dtype=volume.dtype)
        src, dst = self._windows()
        out[dst] = volume[src]
        return out

    def restore(self, canvas: np.ndarray, fill: Optional[float] = None) -> np.ndarray:
        """Canvas ``(*canvas_shape, ...)`` -> source grid. Exact inverse of :meth:`apply` where the source
        was padded; voxels that were cropped away get ``fill`` (default: the nearest canvas value)."""
        canvas = np.asarray(canvas)
        src, dst = self._windows()
        inner = canvas[dst]
        pad = [(w.start, n - w.stop) for w, n in zip(src, self.source_shape)]
        pad += [(0, 0)] * (canvas.ndim - len(self.source_shape))
        if fill is None:
            return np.pad(inner, pad, mode="edge")
        return np.pad(inner, pad, mode="constant", constant_values=fill)


def place(shape: Sequence[int], canvas: Sequence[int]) -> Placement:
    """Centred placement of ``shape`` on ``canvas`` (pads where the canvas is larger, crops where smaller)."""
    shape, canvas = tuple(int(s) for s in shape), tuple(int(c) for c in canvas)
    if len(shape) != len(canvas):
        raise ValueError(f"canvas {canvas} and volume {shape} differ in rank")
    return Placement(shape, canvas, tuple((c - s) // 2 for s, c in zip(shape, canvas)))


@dataclasses.dataclass(frozen=True)
class Preprocessor:
    """The configured preprocessing of one dataset.

    ``resample_shape``: resample every volume to this shape first (None: keep the stored grid).
    ``shape``: the canvas (None: the smallest multiple of ``multiple`` holding the volume).
    """

    normalize: str = "minmax"
    percentiles: Tuple[float, float] = (0.5, 99.5)
    resample_shape: Optional[Tuple[int, ...]] = None
    shape: Optional[Tuple[int, ...]] = None
    multiple: int = 32

    def grid_shape(self, stored_shape: Sequence[int]) -> Tuple[int, ...]:
        return tuple(self.resample_shape) if self.resample_shape else tuple(stored_shape)

    def placement(self, stored_shape: Sequence[int]) -> Placement:
        grid = self.grid_shape(stored_shape)
        canvas = tuple(self.shape) if self.shape else padded_shape(grid, self.multiple)
        if any(c % self.multiple for c in canvas):
            raise ValueError(f"canvas shape {canvas} is not divisible by {self.multiple}")
        return place(grid, canvas)

    def image(self, image: np.ndarray) -> np.ndarray:
        image = normalize(image, self.normalize, *self.percentiles)
        if self.resample_shape:
            image = resample(image, self.resample_shape, order=1)
        return self.placement(image.shape).apply(image)

    def labels(self, labels: np.ndarray) -> np.ndarray:
        if self.resample_shape:
            labels = resample(labels, self.resample_shape, order=0)
        return self.placement(labels.shape).apply(labels)
