"""Intensity-based affine pre-alignment, for inputs that are not affinely aligned (``crd-jax register --affine``).

The transform maps a fixed voxel ``x`` to the moving voxel ``A (x - c) + c + t`` (``c``: the grid's
centre), i.e. the displacement ``u(x) = (A - I)(x - c) + t``, the convention of every field in crd-jax.
``A`` and ``t`` are found coarse to fine (the images downsampled so that the longest side is 32, then 64
voxels) by Adam (optax) on a similarity (global NCC, i.e. the correlation coefficient over the whole image:
a local 9^3 NCC rewards zooming into structure at these coarse levels; or NMI for multi-modal pairs),
starting from the identity; each level is one compiled ``lax.fori_loop``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from crd_jax import losses
from crd_jax.ops.spatial import identity_grid, resize, warp


@dataclasses.dataclass(frozen=True)
class AffineResult:
    matrix: np.ndarray  # A, (ndim, ndim)
    translation: np.ndarray  # t, voxels of the fixed grid
    loss_before: float
    loss_after: float

    def displacement(self, shape: Sequence[int]) -> np.ndarray:
        """``u(x) = (A - I)(x - c) + t`` on a grid of ``shape`` (the fixed grid)."""
        return np.asarray(_affine_field(jnp.asarray(self.matrix), jnp.asarray(self.translation), tuple(shape)))

    def voxel_transform(self, shape: Sequence[int]) -> np.ndarray:
        """The homogeneous fixed-voxel -> moving-voxel matrix."""
        ndim = len(shape)
        c = (np.asarray(shape, np.float64) - 1) / 2
        out = np.eye(ndim + 1)
        out[:ndim, :ndim] = self.matrix
        out[:ndim, ndim] = c - self.matrix @ c + self.translation
        return out

    def world_transform(self, shape: Sequence[int], fixed_affine: np.ndarray, moving_affine: np.ndarray) -> np.ndarray:
        """Fixed world (mm) -> moving world (mm), for a moving image resampled onto the fixed grid first
        through ``moving_affine`` (so the two grids share world coordinates)."""
        del moving_affine  # the moving image was put on the fixed grid through the world: same frame
        n, small = len(shape), self.voxel_transform(shape)
        voxel = np.eye(len(fixed_affine))  # a 2-D image's voxel (i, j) is (i, j, 0) of its 4x4 NIfTI affine
        voxel[:n, :n], voxel[:n, -1] = small[:n, :n], small[:n, n]
        return fixed_affine @ voxel @ np.linalg.inv(fixed_affine)


def global_ncc(fixed: jax.Array, warped: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Minus the correlation coefficient of the two images, over all voxels (mean over the batch)."""
    axes = tuple(range(1, fixed.ndim))
    f = fixed - jnp.mean(fixed, axis=axes, keepdims=True)
    w = warped - jnp.mean(warped, axis=axes, keepdims=True)
    corr = jnp.sum(f * w, axis=axes) / jnp.sqrt(jnp.sum(f * f, axis=axes) * jnp.sum(w * w, axis=axes) + eps)
    return -jnp.mean(corr)


def _affine_field(matrix, translation, shape: Tuple[int, ...]):
    grid = identity_grid(shape)
    c = (jnp.asarray(shape, jnp.float32) - 1) / 2
    return jnp.einsum("ij,...j->...i", matrix - jnp.eye(len(shape)), grid - c) + translation


def _level_shape(shape, longest: int) -> Tuple[int, ...]:
    scale = min(1.0, longest / max(shape))
    return tuple(max(8, int(round(s * scale))) for s in shape)


@functools.lru_cache(maxsize=8)
def _optimiser(shape: Tuple[int, ...], steps: int, similarity: str, lr_matrix: float, lr_translation: float):
    sim = global_ncc if similarity == "ncc" else losses.similarity(similarity, 9)
    opt = optax.multi_transform({"m": optax.adam(lr_matrix), "t": optax.adam(lr_translation)}, {"m": "m", "t": "t"})

    def loss(p, m, f):
        disp = _affine_field(jnp.eye(len(shape)) + p["m"], p["t"], shape)[None]
        return sim(f, warp(m, disp))

    def run(p, m, f):
        def body(_, carry):
            p, state = carry
            g = jax.grad(loss)(p, m, f)
            updates, state = opt.update(g, state, p)
            return optax.apply_updates(p, updates), state

        before = loss(p, m, f)
        p, _ = jax.lax.fori_loop(0, steps, body, (p, opt.init(p)))
        return p, before, loss(p, m, f)

    return jax.jit(run)


def align(
    fixed: np.ndarray,
    moving: np.ndarray,
    similarity: str = "ncc",
    levels: Sequence[int] = (32, 64),
    steps: Sequence[int] = (300, 150),
) -> AffineResult:
    """Affine alignment of ``moving`` to ``fixed`` (arrays on one grid, intensities roughly in [0, 1])."""
    shape = tuple(fixed.shape)
    ndim = len(shape)
    f_full = jnp.asarray(fixed, jnp.float32)[None, ..., None]
    m_full = jnp.asarray(moving, jnp.float32)[None, ..., None]
    p = {"m": jnp.zeros((ndim, ndim), jnp.float32), "t": jnp.zeros((ndim,), jnp.float32)}
    first = last = None
    for longest, n in zip(levels, steps):
        lshape = _level_shape(shape, longest)
        scale = jnp.asarray([l / s for l, s in zip(lshape, shape)], jnp.float32)
        f, m = resize(f_full, lshape), resize(m_full, lshape)
        # in this level's voxels (half-pixel centres keep the centre): A_l = S A S^-1, t_l = S t
        eye = jnp.eye(ndim)
        a_level = (scale[:, None] * (eye + p["m"])) / scale[None, :]
        q = {"m": a_level - eye, "t": p["t"] * scale}
        q, before, after = _optimiser(lshape, int(n), similarity, 3e-3, 0.2)(q, m, f)
        p = {"m": ((eye + q["m"]) / scale[:, None]) * scale[None, :] - eye, "t": q["t"] / scale}
        first = float(before) if first is None else first
        last = float(after)
    return AffineResult(np.asarray(jnp.eye(ndim) + p["m"], np.float64), np.asarray(p["t"], np.float64), first, last)


def itk_affine_text(world: np.ndarray) -> str:
    """An ITK ``AffineTransform_double_3_3`` text file (LPS) for a RAS fixed-world -> moving-world matrix:
    what ``antsApplyTransforms``/ITK/Slicer read (ITK transforms map fixed points to moving points)."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps = flip @ world @ flip
    params = list(lps[:3, :3].ravel()) + list(lps[:3, 3])
    return (
        "#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
        f"Parameters: {' '.join(f'{v:.10g}' for v in params)}\nFixedParameters: 0 0 0\n"
    )
