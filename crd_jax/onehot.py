"""One-hot (linear) interpolation of a label map, on the device: ``crd-jax apply --interpolation onehot``.

Each label's indicator interpolated linearly and the largest taken per voxel is, at a point, the label whose
corners of the surrounding cell carry the most interpolation weight. Only the (at most ``2^ndim``) labels at
those corners can win, so the result needs one gather of the corner labels and ``4^ndim`` comparisons per
voxel, whatever the number of labels (a loop over labels with one SciPy pass each costs ~56 passes for an
LPBA40 atlas). Ties go as in :func:`crd_jax.transforms.apply_to_labels`: background first, then the smaller
label value. Outside the image the edge values continue (SciPy's ``mode="nearest"``).
"""

from __future__ import annotations

import functools
import itertools

import numpy as np


def _compact(labels: np.ndarray):
    """``(indices int32, values)``, ``values[indices] == labels``, background (0) at index 0 and the other values
    ascending after it: index order is the tie order."""
    values = np.unique(labels)
    values = np.concatenate([np.zeros(1, values.dtype), values[values != 0]])
    return np.where(labels == 0, 0, np.searchsorted(values[1:], labels) + 1).astype(np.int32), values


@functools.lru_cache(maxsize=None)
def _program(ndim: int):
    import jax
    import jax.numpy as jnp

    corners = list(itertools.product((0, 1), repeat=ndim))

    @jax.jit
    def run(indices, coords):
        shape = indices.shape
        base = jnp.floor(coords)
        frac = coords - base
        base = base.astype(jnp.int32)
        flat = indices.reshape(-1)
        strides = [int(np.prod(shape[k + 1 :])) for k in range(ndim)]
        labels, weights = [], []
        for corner in corners:
            offset = jnp.zeros(coords.shape[1:], jnp.int32)
            w = jnp.ones(coords.shape[1:], jnp.float32)
            for k, c in enumerate(corner):
                offset = offset + jnp.clip(base[k] + c, 0, shape[k] - 1) * strides[k]
                w = w * (frac[k] if c else 1.0 - frac[k])
            labels.append(flat[offset])
            weights.append(w)
        best_label, best_score = labels[0], None
        for i, li in enumerate(labels):
            score = sum(jnp.where(lj == li, wj, 0.0) for lj, wj in zip(labels, weights))
            if best_score is None:
                best_score = score
                continue
            # a higher score wins; on a tie the smaller index (background first, then the smaller value)
            win = (score > best_score) | ((score == best_score) & (li < best_label))
            best_label = jnp.where(win, li, best_label)
            best_score = jnp.where(win, score, best_score)
        return best_label

    return run


def warp_labels_onehot(labels: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """``labels`` sampled at ``coords`` (``(ndim, *out_shape)`` voxel coordinates in ``labels``) by one-hot
    linear interpolation; the result has ``labels``' dtype and values."""
    import jax.numpy as jnp

    labels = np.asarray(labels)
    indices, values = _compact(labels)
    coords = jnp.asarray(np.asarray(coords, np.float32))
    winner = np.asarray(_program(labels.ndim)(jnp.asarray(indices), coords))
    return values[winner].astype(labels.dtype, copy=False)
