"""Pure, N-d (2-D and 3-D), channels-last array functions: spatial transforms and convolution."""

from crd_jax.ops.conv import conv, conv_reference
from crd_jax.ops.spatial import (
    compose,
    downsample_field,
    identity_grid,
    integrate_velocity,
    resize,
    resize_field,
    upsample_field,
    warp,
)

__all__ = [
    "conv",
    "conv_reference",
    "compose",
    "downsample_field",
    "identity_grid",
    "integrate_velocity",
    "resize",
    "resize_field",
    "upsample_field",
    "warp",
]
