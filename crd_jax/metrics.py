"""Evaluation metrics (paper Section IV-C), numpy on single volumes.

Fields here are one displacement ``(*spatial, ndim)`` in voxels (no batch axis); label maps are integer
arrays ``(*spatial)``.

* :func:`dice`: overlap per label (the paper's similarity metric, averaged over structures).
* :func:`jacobian_determinant`, :func:`count_folds` (the paper's "Folds": voxels with det J <= 0),
  :func:`percent_folds`, :func:`sdlogj` (Learn2Reg's smoothness score).
* :func:`hd95`: 95th-percentile symmetric Hausdorff distance per label, in the units of ``spacing``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from scipy import ndimage


def dice(seg_a: np.ndarray, seg_b: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """Dice ``2|A & B| / (|A| + |B|)`` for each label; NaN where the label is absent from both maps."""
    seg_a, seg_b = np.asarray(seg_a), np.asarray(seg_b)
    if seg_a.shape != seg_b.shape:
        raise ValueError(f"dice: shapes differ, {seg_a.shape} vs {seg_b.shape}")
    out = np.empty(len(labels), dtype=np.float64)
    for i, label in enumerate(labels):
        a, b = seg_a == label, seg_b == label
        denom = a.sum() + b.sum()
        out[i] = 2.0 * np.logical_and(a, b).sum() / denom if denom else np.nan
    return out


def jacobian_determinant(disp: np.ndarray) -> np.ndarray:
    """det(I + grad u) at every voxel of a displacement ``(*spatial, ndim)``.

    Central differences inside, one-sided at the border (``np.gradient``), as in VoxelMorph's
    ``jacobian_determinant``.
    """
    disp = np.asarray(disp, dtype=np.float64)
    ndim = disp.shape[-1]
    if disp.ndim != ndim + 1 or ndim not in (2, 3):
        raise ValueError(f"expected a 2-D or 3-D displacement (*spatial, ndim), got {disp.shape}")
    # jac[..., i, j] = d(x_i + u_i) / d x_j
    grads = [np.gradient(disp[..., i], axis=tuple(range(ndim))) for i in range(ndim)]
    jac = np.stack([np.stack(g, axis=-1) for g in grads], axis=-2) + np.eye(ndim)
    return np.linalg.det(jac)


def count_folds(disp: np.ndarray) -> int:
    """Number of voxels where the transform folds (det J <= 0): the paper's "Folds"."""
    return int(np.sum(jacobian_determinant(disp) <= 0))


def percent_folds(disp: np.ndarray) -> float:
    """Folds as a percentage of the voxels."""
    det = jacobian_determinant(disp)
    return float(100.0 * np.mean(det <= 0))


def sdlogj(disp: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """Standard deviation of log det J (Learn2Reg), determinants clipped to [1e-9, 1e9]."""
    logj = np.log(np.clip(jacobian_determinant(disp), 1e-9, 1e9))
    if mask is not None:
        logj = logj[np.asarray(mask, bool)]
    return float(np.std(logj))


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of the mask with at least one face-neighbour outside it."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def hd95(
    seg_a: np.ndarray, seg_b: np.ndarray, labels: Sequence[int], spacing: Optional[Sequence[float]] = None
) -> np.ndarray:
    """95th-percentile Hausdorff distance per label between the surfaces of two label maps.

    For each label: the distances from every surface voxel of A to the nearest surface voxel of B and
    back; the larger of the two directed 95th percentiles (MONAI's and Learn2Reg's definition). NaN where
    the label is missing from either map.
    """
    seg_a, seg_b = np.asarray(seg_a), np.asarray(seg_b)
    if seg_a.shape != seg_b.shape:
        raise ValueError(f"hd95: shapes differ, {seg_a.shape} vs {seg_b.shape}")
    spacing = (1.0,) * seg_a.ndim if spacing is None else tuple(float(s) for s in spacing)
    out = np.empty(len(labels), dtype=np.float64)
    for i, label in enumerate(labels):
        a, b = seg_a == label, seg_b == label
        if not a.any() or not b.any():
            out[i] = np.nan
            continue
        sa, sb = _surface(a), _surface(b)
        dist_to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)
        dist_to_a = ndimage.distance_transform_edt(~sa, sampling=spacing)
        out[i] = max(np.percentile(dist_to_b[sa], 95), np.percentile(dist_to_a[sb], 95))
    return out
