"""An affine pre-alignment network (VTN's affine subnet, Zhao et al. 2019), and a model that puts it in
front of any deformable backbone (the paper embeds one for LPBA40 and SLIVER, Section IV-B-2).

:class:`AffineNet` encodes ``concat(moving, fixed)`` with stride-2 convolutions, pools globally and
regresses ``A`` (ndim x ndim) and ``t``; the last layer starts at zero, so the network starts at the
identity. The transform acts about the image centre ``c``: the moving image is sampled at
``c + (I + A)(x - c) + t``, i.e. the displacement ``u(x) = A (x - c) + t`` in voxels.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from crd_jax.models.layers import Conv, concat
from crd_jax.models.output import ModelOutput, as_output
from crd_jax.ops.spatial import compose, identity_grid, warp


def affine_field(matrix: jax.Array, translation: jax.Array, shape: Sequence[int]) -> jax.Array:
    """``u(x) = A (x - c) + t`` on a grid of ``shape``; ``matrix`` (B, d, d), ``translation`` (B, d)."""
    grid = identity_grid(shape)
    centre = (jnp.asarray(shape, jnp.float32) - 1) / 2
    rel = grid - centre
    return jnp.einsum("bij,...j->b...i", matrix, rel) + translation.reshape(translation.shape[0], *([1] * len(shape)), -1)


class AffineNet(nn.Module):
    channels: Tuple[int, ...] = (16, 32, 64, 128, 256)
    negative_slope: float = 0.2

    @nn.compact
    def __call__(self, moving: jax.Array, fixed: jax.Array) -> Dict:
        ndim = moving.ndim - 2
        h = concat([moving, fixed])
        for i, c in enumerate(self.channels):
            h = Conv(c, stride=2, negative_slope=self.negative_slope, name=f"conv_{i}")(h)
        h = jnp.mean(h, axis=tuple(range(1, ndim + 1)))
        out = nn.Dense(ndim * ndim + ndim, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros, name="head")(h)
        matrix = out[:, : ndim * ndim].reshape(-1, ndim, ndim)
        # Translation in units of the image size, so one learning rate suits any resolution.
        translation = out[:, ndim * ndim :] * jnp.asarray(moving.shape[1:-1], jnp.float32)
        disp = affine_field(matrix, translation, moving.shape[1:-1])
        return ModelOutput(disp=disp, extras={"matrix": matrix + jnp.eye(ndim), "translation": translation})


class AffineThenDeformable(nn.Module):
    """Affine network, then the deformable backbone on the affinely warped moving image.

    The total displacement composes both: ``warp(M, total) = warp(warp(M, affine), deformable)``. The
    features (and pyramid fields) are the deformable backbone's.
    """

    affine: nn.Module
    deformable: nn.Module

    @nn.compact
    def __call__(self, moving: jax.Array, fixed: jax.Array) -> Dict:
        a = self.affine(moving, fixed)
        out = as_output(self.deformable(warp(moving, a.disp), fixed))
        out = out.replace(
            disp=compose(a.disp, out.disp), extras={**out.extras, "deformable_disp": out.disp, "affine_disp": a.disp}
        )
        return out
