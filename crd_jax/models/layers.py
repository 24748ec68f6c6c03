"""Flax building blocks shared by every model."""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from crd_jax.ops.conv import conv, conv_upsampled_concat
from crd_jax.ops.spatial import upsample_nearest  # noqa: F401  (re-exported for the models)
from crd_jax.typing import Params


def torch_default_bias_init(fan_in: int) -> Callable[..., jax.Array]:
    """PyTorch's default bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in)), so training starts like the authors'."""

    def init(key, shape, dtype=jnp.float32):
        bound = 1.0 / np.sqrt(fan_in)
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# PyTorch's default Conv kernel init (kaiming_uniform with a = sqrt(5)) is U(+-1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class Conv(nn.Module):
    """3^d (or k^d) convolution + bias (+ LeakyReLU), padding ``k // 2``, on :func:`crd_jax.ops.conv`.

    Channels-last, 2-D or 3-D by the rank of the input. ``negative_slope=None`` gives no activation.
    Parameters: ``kernel`` ``(*k, C_in, C_out)`` and ``bias`` ``(C_out,)``.
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    negative_slope: Optional[float] = 0.2
    kernel_init: Optional[object] = None
    bias_init: Optional[object] = None

    @nn.compact
    def __call__(self, x, skip=None):
        """``x``, or with ``skip`` the decoder's ``concat([upsample_nearest(x), skip])`` (one fused op on the
        CPU kernel; the same parameters either way)."""
        ndim = x.ndim - 2
        cin = x.shape[-1] + (0 if skip is None else skip.shape[-1])
        fan_in = cin * self.kernel_size**ndim
        kshape = (self.kernel_size,) * ndim + (cin, self.features)
        kernel = self.param("kernel", self.kernel_init or torch_default_kernel_init, kshape, jnp.float32)
        bias = self.param("bias", self.bias_init or torch_default_bias_init(fan_in), (self.features,), jnp.float32)
        if skip is not None:
            if self.stride != 1:
                raise ValueError("an upsample-and-concatenate input needs stride 1")
            return conv_upsampled_concat(x, skip, kernel, bias, negative_slope=self.negative_slope)
        return conv(x, kernel, bias, stride=self.stride, negative_slope=self.negative_slope)


def decoder_level(
    h: jax.Array, skip: Optional[jax.Array], channels: Sequence[int], level: int, negative_slope: Optional[float]
) -> jax.Array:
    """One decoder level of VM and of the FST head: convs ``dec_{level}_{m}`` of ``channels`` on
    ``concat(upsample_nearest(h), skip)`` (``skip`` None: on ``h`` alone). Call it inside a compact module (the
    convs are that module's). The first conv reads the concatenation without storing it (the same parameters as
    a conv of the stored one); a level without convs returns the concatenation."""
    if skip is not None and not channels:
        return concat([upsample_nearest(h, skip.shape[1:-1]), skip])
    for m, c in enumerate(channels):
        h = Conv(c, negative_slope=negative_slope, name=f"dec_{level}_{m}")(h, skip if m == 0 else None)
    return h


def flow_kernel_init(stddev: float = 1e-5) -> jax.nn.initializers.Initializer:
    """VoxelMorph initialises the flow head near zero so training starts from the identity."""
    return nn.initializers.normal(stddev)


def concat(parts: Union[Sequence[jax.Array], jax.Array]) -> jax.Array:
    """Concatenation along the channel axis. Single-channel parts of one shape (the image pair a network
    reads) are interleaved by a select on the channel index instead: XLA:CPU's concatenate along the minor axis
    moves one element at a time (~15x slower for the pair at 80x96x112, measured)."""
    parts = list(parts)
    first = parts[0]
    if len(parts) > 1 and all(p.shape == first.shape and p.dtype == first.dtype for p in parts) and first.shape[-1] == 1:
        shape = first.shape[:-1] + (len(parts),)
        channel = lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1)
        out = jnp.broadcast_to(parts[-1], shape)
        for i in range(len(parts) - 2, -1, -1):
            out = jnp.where(channel == i, parts[i], out)
        return out
    return jnp.concatenate(parts, axis=-1)


FLOW_INITS = ("torch", "small")


def redraw_flow_heads(params: Params, key: jax.Array, scheme: str = "torch") -> Params:
    """Re-initialises every flow head (a ``flow*`` module holding a ``conv``) of a parameter tree.

    ``small``: VoxelMorph's N(0, 1e-5) kernel and zero bias, as the modules initialise them.
    ``torch``: PyTorch's default U(+-1/sqrt(fan_in)) for kernel and bias, as the authors' code leaves it.
    With losses averaged over voxels and Adam's eps = 1e-8, the ``small`` head passes gradients of 1e-11 to
    1e-7 back into the backbone, below eps, and 3-D LPBA40 training barely moves for hundreds of steps
    (VM-L: val Dice 0.540 vs 0.579 at 300 steps; issue 11); the ``torch`` draw starts a few voxels off the
    identity and trains at once.
    """
    if scheme not in FLOW_INITS:
        raise ValueError(f"flow_init must be one of {FLOW_INITS}, got {scheme!r}")
    if scheme == "small":
        return params
    counter = [0]

    def walk(tree, inside_flow: bool):
        if not isinstance(tree, dict):
            return tree
        out = {}
        for name, sub in tree.items():
            if inside_flow and name == "conv" and isinstance(sub, dict) and {"kernel", "bias"} <= set(sub):
                kernel = sub["kernel"]
                bound = 1.0 / np.sqrt(np.prod(kernel.shape[:-1]))
                k1, k2 = jax.random.split(jax.random.fold_in(key, counter[0]))
                counter[0] += 1
                out[name] = dict(
                    sub,
                    kernel=jax.random.uniform(k1, kernel.shape, kernel.dtype, -bound, bound),
                    bias=jax.random.uniform(k2, sub["bias"].shape, sub["bias"].dtype, -bound, bound),
                )
            else:
                out[name] = walk(sub, inside_flow or str(name).startswith("flow"))
        return out

    return walk(params, False)  # walk builds new dicts: the caller's tree is untouched
