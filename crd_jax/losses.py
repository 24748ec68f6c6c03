"""Registration losses (paper Section III-A), N-d, channels-last ``(B, *spatial, C)``.

* :func:`ncc` is L_sim of eq. 1 (negative local normalised cross-correlation over a ``9^d`` window,
  from separable box sums).
* :func:`grad_l2` is L_reg of eq. 2.
* :func:`mse` is the distillation distance of eq. 8-9; :func:`soft_dice` an overlap score for label maps.

Normalisation follows VoxelMorph (whose ``lambda = 1`` the paper adopts): eq. 1 and eq. 2 are written as
sums over voxels, the code averages over voxels so that ``lambda`` does not depend on the image size.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple, Union

import jax
import jax.numpy as jnp

from crd_jax.ops.spatial import warp


def _box_sum_axis(x: jax.Array, axis: int, window: int) -> jax.Array:
    """Sum over a centred window along one axis, zeros outside (a 1-D ``reduce_window``)."""
    dims = [1] * x.ndim
    dims[axis] = window
    pad = [(0, 0)] * x.ndim
    pad[axis] = (window // 2, window - 1 - window // 2)
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, (1,) * x.ndim, pad)


def box_sum(x: jax.Array, window: Union[int, Sequence[int]]) -> jax.Array:
    """Sum of ``x`` over a centred box around every voxel of ``(B, *spatial, C)`` (zero padding).

    Separable: one 1-D window sum per axis, ``d * window`` additions per voxel instead of the ``window^d``
    multiply-adds of a dense box convolution (VoxelMorph's way). Measured at 160x192x224 on 2 cores, this
    was 2.4x faster forward + backward than cumulative sums, and exact (no large running totals).
    """
    ndim = x.ndim - 2
    windows = (window,) * ndim if isinstance(window, int) else tuple(window)
    for axis, w in enumerate(windows, start=1):
        x = _box_sum_axis(x, axis, w)
    return x


def ncc(fixed: jax.Array, warped: jax.Array, window: int = 9, eps: float = 1e-5) -> jax.Array:
    """L_sim of eq. 1: minus the local (windowed) squared normalised cross-correlation, averaged.

    For every voxel p, with sums over the ``window^d`` box A(p) (zeros beyond the border, ``|A| = window^d``
    as in VoxelMorph): ``cc(p) = cross^2 / (var_f * var_m + eps)`` with
    ``cross = sum (f - mean_f)(m - mean_m)``, ``var = sum (x - mean)^2``. Returns ``-mean_p cc(p)``.
    """
    if fixed.shape != warped.shape:
        raise ValueError(f"ncc: shapes differ, {fixed.shape} vs {warped.shape}")
    ndim = fixed.ndim - 2
    size = float(window**ndim)
    f, m = fixed, warped
    f_sum, m_sum = box_sum(f, window), box_sum(m, window)
    ff, mm, fm = box_sum(f * f, window), box_sum(m * m, window), box_sum(f * m, window)
    f_mean, m_mean = f_sum / size, m_sum / size
    cross = fm - m_mean * f_sum - f_mean * m_sum + f_mean * m_mean * size
    f_var = ff - 2 * f_mean * f_sum + f_mean * f_mean * size
    m_var = mm - 2 * m_mean * m_sum + m_mean * m_mean * size
    cc = cross * cross / (f_var * m_var + eps)
    return -jnp.mean(cc)


def grad_l2(disp: jax.Array) -> jax.Array:
    """L_reg of eq. 2: squared forward differences of the field, mean per axis, averaged over axes."""
    ndim = disp.ndim - 2
    total = 0.0
    for axis in range(1, ndim + 1):
        d = jnp.diff(disp, axis=axis)
        total = total + jnp.mean(d * d)
    return total / ndim


def mse(a: jax.Array, b: jax.Array) -> jax.Array:
    """Mean squared error (eq. 8 and eq. 9 of the distillation)."""
    if a.shape != b.shape:
        raise ValueError(f"mse: shapes differ, {a.shape} vs {b.shape}")
    return jnp.mean((a - b) ** 2)


def soft_dice(y_true: jax.Array, y_pred: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Mean soft Dice coefficient of one-hot / probability maps ``(B, *spatial, L)``, in [0, 1].

    Averaged over batch and labels; a loss is ``1 - soft_dice``.
    """
    if y_true.shape != y_pred.shape:
        raise ValueError(f"soft_dice: shapes differ, {y_true.shape} vs {y_pred.shape}")
    axes = tuple(range(1, y_true.ndim - 1))
    top = 2 * jnp.sum(y_true * y_pred, axis=axes)
    bottom = jnp.sum(y_true, axis=axes) + jnp.sum(y_pred, axis=axes)
    return jnp.mean((top + eps) / (bottom + eps))


def registration_loss(
    moving: jax.Array, fixed: jax.Array, disp: jax.Array, reg_weight: float = 1.0, window: int = 9
) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """``L = L_sim(I_m(phi), I_f) + lambda L_reg(phi)`` (eq. 3), on the grid of ``fixed``.

    For a low-resolution model ``disp`` is already ``up(phi^L)``, which makes this eq. 5; for the teacher
    it is ``up(phi^T)``, eq. 7. Returns the loss and its two terms.
    """
    sim = ncc(fixed, warp(moving, disp), window=window)
    reg = grad_l2(disp)
    return sim + reg_weight * reg, {"sim": sim, "reg": reg}
