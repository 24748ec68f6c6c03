"""The pyramid backbone (the paper's Pyd / Pyd-diff, after Dual-PRNet, Hu et al. 2019).

* A dual-stream encoder: the moving and the fixed image are encoded separately by the same convolutions
  (shared weights) into feature pyramids ``E^m_l``, ``E^f_l`` (level ``l`` at ``1/2^l`` of the input).
* Coarse-to-fine estimation (:class:`PyramidEstimator`): at the deepest level a field is predicted from
  ``concat(E^m, E^f)``; at every finer level the field so far is upsampled (``up``, values times 2), the
  moving features are warped by it, and a residual field ``Delta_l`` is predicted from
  ``concat(warp(E^m_l), E^f_l)`` and composed with it: ``phi_l = compose(up(phi_{l+1}), Delta_l)``, i.e.
  ``warp(warp(M, up(phi_{l+1})), Delta_l) = warp(M, phi_l)``. Pyd-diff predicts velocities and integrates
  each residual by scaling and squaring, so every ``phi_l`` is a composition of diffeomorphisms.

Output: ``{"disp": phi_0, "fields": {l: phi_l}, "features": {l: concat(E^m_l, E^f_l)}}``: the
intermediate fields distilled by eq. 11 and the features of both streams (Section III-C-3).
"""

from __future__ import annotations

from typing import Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from crd_jax.models.layers import Conv, concat
from crd_jax.models.output import ModelOutput
from crd_jax.models.voxelmorph import FlowHead, encoder_levels
from crd_jax.ops.spatial import compose, integrate_velocity, resize_field, warp

PYD_ENCODER = (16, 32, 32, 32, 32)
PYD_STRIDES = (1, 2, 2, 2, 2)
PYD_ESTIMATOR = (32, 16)


class PyramidEncoder(nn.Module):
    """One image -> ``{l: E_l}``, the last conv output at each level."""

    encoder: Tuple[int, ...] = PYD_ENCODER
    encoder_strides: Tuple[int, ...] = PYD_STRIDES
    negative_slope: float = 0.2

    @nn.compact
    def __call__(self, x: jax.Array) -> Dict[int, jax.Array]:
        feats, level, h = {}, 0, x
        for i, (c, s) in enumerate(zip(self.encoder, self.encoder_strides)):
            h = Conv(c, stride=s, negative_slope=self.negative_slope, name=f"enc_{i}")(h)
            level += int(np.log2(s))
            feats[level] = h
        return feats


class PyramidEstimator(nn.Module):
    """Coarse-to-fine fields from per-level feature pairs ``{l: concat(E^m_l, E^f_l)}`` (moving half first).

    ``estimator``: channels of the convs before each level's flow head.
    """

    estimator: Tuple[int, ...] = PYD_ESTIMATOR
    negative_slope: float = 0.2
    diffeomorphic: bool = False
    int_steps: int = 7

    def _residual(self, h: jax.Array, level: int) -> jax.Array:
        for i, c in enumerate(self.estimator):
            h = Conv(c, negative_slope=self.negative_slope, name=f"est_{level}_{i}")(h)
        flow = FlowHead(name=f"flow_{level}")(h)
        return integrate_velocity(flow, self.int_steps) if self.diffeomorphic else flow

    @nn.compact
    def __call__(self, pairs: Dict[int, jax.Array]) -> Dict:
        levels = sorted(pairs, reverse=True)
        fields = {}
        phi = None
        for lev in levels:
            both = pairs[lev]
            half = both.shape[-1] // 2
            moving, fixed = both[..., :half], both[..., half:]
            if phi is None:
                phi = self._residual(concat([moving, fixed]), lev)
            else:
                up = resize_field(phi, both.shape[1:-1])
                delta = self._residual(concat([warp(moving, up), fixed]), lev)
                phi = compose(up, delta)
            fields[lev] = phi
        return ModelOutput(disp=fields[min(levels)], fields=fields)


class Pyramid(nn.Module):
    """Pyd / Pyd-diff: ``(moving, fixed) -> {"disp", "fields", "features"}``. Channels from the config:
    Pyd-light and Pyd-lighter halve them once and twice (Table III)."""

    encoder: Tuple[int, ...] = PYD_ENCODER
    encoder_strides: Tuple[int, ...] = PYD_STRIDES
    estimator: Tuple[int, ...] = PYD_ESTIMATOR
    negative_slope: float = 0.2
    diffeomorphic: bool = False
    int_steps: int = 7

    @nn.compact
    def __call__(self, moving: jax.Array, fixed: jax.Array) -> Dict:
        if moving.shape[:-1] != fixed.shape[:-1]:
            raise ValueError(f"moving {moving.shape} and fixed {fixed.shape} differ in batch or spatial shape")
        encode = PyramidEncoder(self.encoder, self.encoder_strides, self.negative_slope, name="encoder")
        em, ef = encode(moving), encode(fixed)  # one module called twice: shared weights
        features = {lev: concat([em[lev], ef[lev]]) for lev in em}
        out = PyramidEstimator(self.estimator, self.negative_slope, self.diffeomorphic, self.int_steps, name="estimator")(
            features
        )
        out = out.replace(features=features)
        return out
