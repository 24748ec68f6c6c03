"""A backbone run at a chosen input resolution: the paper's -H (factor 1) and -L / -LL (factor n = 2^k).

``Registrar(backbone, factor=n)`` downsamples the pair by ``n`` with linear interpolation (Section
III-B-1), runs the backbone there, and returns the field upsampled back to the input grid, ``up(phi)``
of eq. 5 (values times ``n``). Its parameters are exactly the backbone's, so one parameter tree serves
the high- and low-resolution models (resolution cooperative training shares them, eq. 4-6).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

import flax.linen as nn
import jax

from crd_jax.compile import run_once
from crd_jax.models.output import ModelOutput, as_output
from crd_jax.ops.spatial import resize, upsample_field
from crd_jax.typing import Params


def downsample_pair(moving: jax.Array, fixed: jax.Array, factor: int, align_corners: bool = False) -> Tuple[jax.Array, jax.Array]:
    """``{I_m^L, I_f^L}``: both images resized to ``1/factor`` of their size (linear, half-pixel centres
    unless ``align_corners``)."""
    if factor == 1:
        return moving, fixed
    spatial = moving.shape[1:-1]
    if any(s % factor for s in spatial):
        raise ValueError(f"input size {spatial} is not divisible by the resolution factor {factor}")
    low = [s // factor for s in spatial]
    return resize(moving, low, align_corners), resize(fixed, low, align_corners)


@dataclasses.dataclass(frozen=True)
class Registrar:
    """Backbone + input resolution factor. ``apply`` returns the backbone's dict with ``disp`` on the
    input grid, plus ``disp_low`` (the field on the backbone's own grid, phi^L) and ``factor``."""

    backbone: nn.Module
    factor: int = 1

    def __post_init__(self):
        if self.factor < 1 or self.factor & (self.factor - 1):
            raise ValueError(f"resolution factor must be a power of two (n = 2^k), got {self.factor}")

    @property
    def shift(self) -> int:
        """k with n = 2^k: the number of levels the feature-shifted teacher shifts (Section III-B-2)."""
        return self.factor.bit_length() - 1

    def init(self, key: jax.Array, moving: jax.Array, fixed: jax.Array) -> Params:
        """Parameters for inputs shaped like ``moving``/``fixed`` (compiled: eager init is slow)."""
        m, f = downsample_pair(moving, fixed, self.factor)
        return run_once(lambda k, m, f: self.backbone.init(k, m, f)["params"], key, m, f)

    def apply(self, params: Params, moving: jax.Array, fixed: jax.Array) -> ModelOutput:
        m, f = downsample_pair(moving, fixed, self.factor)
        out = as_output(self.backbone.apply({"params": params}, m, f))
        low = out.disp
        return out.replace(disp_low=low, disp=upsample_field(low, self.factor) if self.factor > 1 else low)
