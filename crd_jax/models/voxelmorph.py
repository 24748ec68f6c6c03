"""VoxelMorph U-Net (Balakrishnan et al. 2019; VM-diff: Dalca et al. 2018), the paper's VM backbone.

The architecture is data: channel lists come from the config, so VM, VM-light, VM-lighter and VM-large
(Section IV-D, Table III) and the authors' own layout are configurations of one module.

* ``encoder``: output channels of each encoder conv; ``encoder_strides`` their strides (2 halves the
  size, 1 keeps it). The paper's VM: ``(16, 32, 32, 32)`` all stride 2. The authors' released code adds
  a stride-1 conv first: ``(16, 32, 32, 32, 32)`` with strides ``(1, 2, 2, 2, 2)``.
* ``decoder``: per level, deepest first, the channels of the convs at that level. Level ``l`` has
  ``1/2^l`` of the input size; each level below the deepest starts from the nearest-upsampled previous
  output concatenated with the encoder's last output at that level (the input pair at level 0 if no
  encoder conv runs at full size). VoxelMorph-2: ``((32,), (32,), (32,), (32, 32), (16, 16))``.
* ``encoder_pooling``: ``"stride"`` (the encoder convs themselves have the strides; the paper's VM and the
  authors' code) or ``"maxpool"`` (each encoder conv runs at stride 1 and is followed by 2^d max pooling
  where its stride is 2; voxelmorph 0.2's ``VxmDense`` and MONAI's ``VoxelMorph``, whose decoder is
  ``((32,), (32,), (32,), (32,), (32, 16, 16))``).
* Every conv is 3^d, padding 1, LeakyReLU(0.2); the flow head is a 3^d conv to ``ndim`` channels,
  initialised near zero.

Output: a :class:`~crd_jax.models.output.ModelOutput` with ``disp`` and ``features`` ``{l: F_l}``, the last
decoder feature of level ``l`` (the paper's decoder features, Section III-A), plus ``velocity`` for the
diffeomorphic variant.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np

from crd_jax.models.layers import Conv, concat, decoder_level, flow_kernel_init
from crd_jax.models.output import ModelOutput
from crd_jax.ops.spatial import integrate_velocity

VM_ENCODER = (16, 32, 32, 32)
VM_DECODER = ((32,), (32,), (32,), (32, 32), (16, 16))


def encoder_levels(strides: Sequence[int]) -> int:
    """Number of halvings the encoder applies (the deepest feature level)."""
    level = 0
    for s in strides:
        if s not in (1, 2):
            raise ValueError(f"encoder strides must be 1 or 2, got {s}")
        level += int(np.log2(s))
    return level


class UNet(nn.Module):
    """Encoder-decoder returning the decoder features by level, ``{l: F_l}``."""

    encoder: Tuple[int, ...] = VM_ENCODER
    encoder_strides: Tuple[int, ...] = (2, 2, 2, 2)
    decoder: Tuple[Tuple[int, ...], ...] = VM_DECODER
    negative_slope: float = 0.2
    encoder_pooling: str = "stride"

    @nn.compact
    def __call__(self, x: jax.Array) -> Dict[int, jax.Array]:
        if len(self.encoder) != len(self.encoder_strides):
            raise ValueError("encoder and encoder_strides must have the same length")
        deepest = encoder_levels(self.encoder_strides)
        if len(self.decoder) != deepest + 1:
            raise ValueError(f"decoder needs one entry per level 0..{deepest}, got {len(self.decoder)}")
        if self.encoder_pooling not in ("stride", "maxpool"):
            raise ValueError(f"encoder_pooling must be 'stride' or 'maxpool', got {self.encoder_pooling!r}")
        skips = {0: x}
        level, h = 0, x
        for i, (channels, stride) in enumerate(zip(self.encoder, self.encoder_strides)):
            if self.encoder_pooling == "stride":
                h = Conv(channels, stride=stride, negative_slope=self.negative_slope, name=f"enc_{i}")(h)
                level += int(np.log2(stride))
            else:
                h = Conv(channels, negative_slope=self.negative_slope, name=f"enc_{i}")(h)
                skips[level] = h
                if stride == 2:
                    ndim = h.ndim - 2
                    h = nn.max_pool(h, (2,) * ndim, strides=(2,) * ndim, padding="VALID")
                    level += 1
            skips[level] = h
        features = {}
        h = skips[deepest]
        for j, channels in enumerate(self.decoder):
            lev = deepest - j
            h = decoder_level(h, skips[lev] if lev != deepest else None, channels, lev, self.negative_slope)
            features[lev] = h
        return features


class FlowHead(nn.Module):
    """The last 3^d conv to a displacement (or velocity) with ``ndim`` channels."""

    @nn.compact
    def __call__(self, h):
        ndim = h.ndim - 2
        return Conv(ndim, negative_slope=None, kernel_init=flow_kernel_init(), bias_init=nn.initializers.zeros, name="conv")(h)


class VoxelMorph(nn.Module):
    """VM / VM-diff: ``(moving, fixed) -> {"disp", "features"[, "velocity"]}`` on the input's grid.

    The pair enters as ``concat([moving, fixed])`` on the channel axis (VoxelMorph's order).
    """

    encoder: Tuple[int, ...] = VM_ENCODER
    encoder_strides: Tuple[int, ...] = (2, 2, 2, 2)
    decoder: Tuple[Tuple[int, ...], ...] = VM_DECODER
    negative_slope: float = 0.2
    diffeomorphic: bool = False
    int_steps: int = 7
    encoder_pooling: str = "stride"

    @nn.compact
    def __call__(self, moving: jax.Array, fixed: jax.Array) -> Dict:
        if moving.shape[:-1] != fixed.shape[:-1]:
            raise ValueError(f"moving {moving.shape} and fixed {fixed.shape} differ in batch or spatial shape")
        unet = UNet(self.encoder, self.encoder_strides, self.decoder, self.negative_slope, self.encoder_pooling, name="unet")
        features = unet(concat([moving, fixed]))
        flow = FlowHead(name="flow")(features[0])
        if not self.diffeomorphic:
            return ModelOutput(disp=flow, features=features)
        return ModelOutput(disp=integrate_velocity(flow, self.int_steps), velocity=flow, features=features)
