"""Convolution + bias + LeakyReLU as one differentiable op, with a fast CPU path.

``conv(x, w, b, stride, padding, negative_slope)`` computes ``act(conv(x, w) + b)`` for 2-D and 3-D
channels-last inputs. Two implementations of the same maths:

* the reference: ``lax.conv_general_dilated`` (used on GPU/TPU, for non-float32 inputs, and in tests as
  the ground truth);
* on CPU, the native direct convolution of ``csrc/conv_direct*.cc`` and ``csrc/conv_winograd_avx512.cc``
  (see :mod:`crd_jax.ops.native` and ``docs/native-kernel.md``).

Either way the op has a custom VJP that keeps only the input ``x`` and the activated output ``y`` for the
backward pass (LeakyReLU's derivative is read off the sign of ``y``), so a network of these blocks stores
one activation per layer instead of two. Input gradients of stride-1 convolutions are themselves
convolutions with flipped, transposed weights, so they run on the fast path too.

``conv_upsampled_concat(low, skip, w, b)`` is the U-Net decoder's ``conv(concat([up(low), skip]))``; on the
native path its forward never materialises the concatenation (the largest tensor of the network), nor does its
backward where the skip is exactly twice the coarse grid: the upsampled channels' input gradient is then a
Winograd pass keeping the 27 of 64 products that each 2x2x2 block's sum needs (or a stride-2 correlation on the
coarse grid, :func:`coarse_tap_matrix`, 0.30 of the fine work for 3^3 kernels), and the weight gradient one
Winograd pass that reads the upsampled channels on their coarse grid (3-D, AVX-512, fine grids from 16^3:
:func:`_upcat_wgrad_fused_applies`), else the coarse correlation's plus the skip's (:func:`upcat_backward`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Iterator, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from crd_jax.ops import native
from crd_jax.ops.spatial import upsample_nearest

IntOrSeq = Union[int, Sequence[int]]
Padding = Tuple[Tuple[int, int], ...]


def _check_slope(negative_slope) -> None:
    if negative_slope is not None and not negative_slope > 0:
        raise ValueError("negative_slope must be positive (its sign is used to recover the gradient)")


def _tuple(v: IntOrSeq, n: int) -> Tuple[int, ...]:
    return tuple(int(a) for a in v) if isinstance(v, (tuple, list)) else (int(v),) * n


def default_padding(kernel_shape: Sequence[int]) -> Padding:
    """Symmetric ``k // 2`` padding on each side (PyTorch's ``padding=k//2``, VoxelMorph's choice)."""
    return tuple((k // 2, k // 2) for k in kernel_shape)


def _dimension_numbers(ndim: int):
    return ("NHWC", "HWIO", "NHWC") if ndim == 2 else ("NDHWC", "DHWIO", "NDHWC")


def _lax_conv(x, w, stride, padding):
    ndim = x.ndim - 2
    return lax.conv_general_dilated(x, w, window_strides=stride, padding=padding, dimension_numbers=_dimension_numbers(ndim))


def _activate(z, negative_slope):
    return z if negative_slope is None else jnp.where(z >= 0, z, negative_slope * z)


def conv_reference(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array,
    stride: IntOrSeq = 1,
    padding: Optional[Padding] = None,
    negative_slope: Optional[float] = None,
) -> jax.Array:
    """The same op written with ``lax.conv_general_dilated`` and ordinary autodiff (ground truth)."""
    ndim = x.ndim - 2
    padding = default_padding(w.shape[:ndim]) if padding is None else tuple(map(tuple, padding))
    z = _lax_conv(x, w, _tuple(stride, ndim), padding) + b
    return _activate(z, negative_slope)


# --- native building blocks (CPU only), all on 5-D arrays -------------------------------------------


def _as_3d(x, w, stride, padding):
    """Views a 2-D problem as 3-D with a depth of one, as the native kernel expects."""
    if x.ndim == 4:
        x = x[:, None]
        if w is not None:
            w = w[None]
        stride = (1,) + tuple(stride)
        padding = ((0, 0),) + tuple(padding)
    return x, w, stride, padding


def _out_shape(in_shape, kernel, stride, padding):
    return tuple((n + lo + hi - k) // s + 1 for n, k, s, (lo, hi) in zip(in_shape, kernel, stride, padding))


def _geometry(stride5, padding5) -> dict:
    """Strides and low-side paddings of a 5-D problem, as the kernels' FFI attributes."""
    names = ("sd", "sh", "sw", "pd", "ph", "pw")
    values = tuple(stride5) + tuple(p[0] for p in padding5)
    return {k: np.int64(v) for k, v in zip(names, values)}


_settings: dict = {}


def bf16_inference(enabled: Optional[bool] = None) -> bool:
    """Opt-in bfloat16 inference: convolutions outside differentiation (inference) round their input and
    weights to bfloat16 and accumulate in float32, on CPUs with AVX512-BF16 (twice the multiply-adds per
    instruction; on CPUs with AMX, Intel Sapphire Rapids and later, tile-register matrix products, ~16x the
    float32 FMA rate: :func:`crd_jax.ops.native.bf16_engine`); training and every other CPU keep float32. ``enabled`` sets it for this process (read when
    a function is traced, so set it before the first call), ``None`` reads it; default from the
    environment, ``CRD_JAX_CONV_BF16=1``. Returns whether it is on."""
    if enabled is not None:
        _settings["bf16"] = bool(enabled)
    return _settings.setdefault("bf16", os.environ.get("CRD_JAX_CONV_BF16", "0") == "1")


_training_bf16 = contextvars.ContextVar("crd_jax_bf16_training", default=False)


@contextlib.contextmanager
def bf16_training(enabled: bool = True) -> Iterator[None]:
    """Opt-in bfloat16 training (``config.train.bf16``): the convolutions *traced inside the block* run their
    forward passes and their input gradients (native forward convolutions of the output gradient with flipped
    weights) with inputs and weights rounded to bfloat16 and float32 sums, on CPUs with AVX512-BF16 or AMX.
    Weight gradients, bias gradients and everything outside the convolutions stay float32, and so do the
    parameters and optimizer state the caller keeps. The setting is read when :func:`conv` /
    :func:`conv_upsampled_concat` are traced and travels with each call as a static argument of its custom VJP
    (so a backward pass traced later sees the value of its forward). ``jax.jit`` does not key its cache on it:
    a jitted function first traced inside the block keeps bfloat16 when called outside, and the reverse, so
    open the block inside the traced function (as the train step does), not around calls of a jitted one. The train step opens it
    (:func:`crd_jax.training.loop.make_train_step`); callers check :func:`crd_jax.ops.native.has_bf16` first
    (on other CPUs the block changes nothing: the kernels' float32 path runs)."""
    token = _training_bf16.set(bool(enabled))
    try:
        yield
    finally:
        _training_bf16.reset(token)


def _bf16_for(w, wanted: bool) -> bool:
    """Whether a native forward with weights ``w`` (``(*k, C_in, C_out)``) runs in bfloat16: asked for, on a CPU
    with AVX512-BF16; the 3-channel flow head keeps float32 (and its own kernel): a small share of the work."""
    return bool(wanted) and w.shape[-1] >= 8 and native.has_bf16()


def _pairs_as_float32(a):
    """bfloat16 values of ``a`` with their last axis paired up (padded to even) and each pair's 32 bits viewed
    as one float32, the layout the kernel's VDPBF16PS and AMX tiles read."""
    if a.shape[-1] % 2:
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, 1)])
    pairs = a.astype(jnp.bfloat16).reshape(*a.shape[:-1], a.shape[-1] // 2, 2)
    return lax.bitcast_convert_type(pairs, jnp.float32)


def _packed_weights(w5, bf16):
    """Output channels padded to a multiple of 8; with ``bf16`` input channels paired up as the kernel reads them
    ``(KD, KH, KW, Ci, CoP) -> (KD, KH, KW, Ci / 2, CoP)``."""
    cout = w5.shape[-1]
    w_packed = jnp.pad(w5, [(0, 0)] * 4 + [(0, -(-cout // 8) * 8 - cout)])
    if bf16:
        w_packed = jnp.swapaxes(_pairs_as_float32(jnp.swapaxes(w_packed, -1, -2)), -1, -2)
    return w_packed


def _native_forward(x, w, b, stride, padding, negative_slope, out_spatial=None, bf16=False):
    """Native forward; ``out_spatial`` overrides the output size (taps beyond the input read zeros); ``bf16``:
    input and weights rounded to bfloat16, float32 sums (AVX512-BF16)."""
    squeeze = x.ndim == 4
    x5, w5, stride5, padding5 = _as_3d(x, w, stride, padding)
    cout = w5.shape[-1]
    if out_spatial is None:
        spatial = _out_shape(x5.shape[1:4], w5.shape[:3], stride5, padding5)
    else:
        spatial = (1,) * (3 - len(out_spatial)) + tuple(out_spatial)
    if bf16:
        x5 = _pairs_as_float32(x5)
    out = jax.ShapeDtypeStruct((x5.shape[0], *spatial, cout), jnp.float32)
    y = jax.ffi.ffi_call("crd_conv_fwd", out, vmap_method="sequential")(
        x5,
        _packed_weights(w5, bf16),
        b,
        slope=np.float32(0.0 if negative_slope is None else negative_slope),
        act=np.int64(negative_slope is not None),
        bf16=np.int64(bf16),
        **_geometry(stride5, padding5),
    )
    return y[:, 0] if squeeze else y


def _native_weight_grad(x, dz, kernel_shape, stride, padding):
    ndim = x.ndim - 2
    x5, _, stride5, padding5 = _as_3d(x, None, stride, padding)
    dz5 = dz[:, None] if ndim == 2 else dz
    kernel5 = (1,) + tuple(kernel_shape) if ndim == 2 else tuple(kernel_shape)
    out = jax.ShapeDtypeStruct((*kernel5, x.shape[-1], dz.shape[-1]), jnp.float32)
    dw = jax.ffi.ffi_call("crd_conv_wgrad", out, vmap_method="sequential")(x5, dz5, **_geometry(stride5, padding5))
    return dw[0] if ndim == 2 else dw


def _flip_transpose(w):
    ndim = w.ndim - 2
    return jnp.swapaxes(jnp.flip(w, axis=tuple(range(ndim))), -1, -2)


def _transposed_padding(kernel_shape, padding):
    return tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(kernel_shape, padding))


def _phase_taps(k: int, s: int, p: int, r: int):
    """Taps of a strided convolution that reach input positions ``i = s * m + r``.

    Forward: ``y[o] += x[o * s - p + t] w[t]``. So ``x[s * m + r]`` receives ``dy[m + d] w[t]^T`` for every
    tap with ``d = (r + p - t) / s`` integral. Returns the sub-kernel as a list indexed by ``d - d_min``
    (None where no tap lands) and ``-d_min``, the low padding of the stride-1 correlation that applies it.
    """
    offsets = {(r + p - t) // s: t for t in range(k) if (r + p - t) % s == 0}
    if not offsets:
        return [None], 0
    lo, hi = min(offsets), max(offsets)
    return [offsets.get(d) for d in range(lo, hi + 1)], -lo


def _native_input_grad_strided(dz, w, x_shape, stride, padding, bf16=False):
    """Input gradient of a strided convolution by polyphase decomposition.

    Each residue class of input positions modulo the stride receives a stride-1 correlation of ``dz`` with
    a sub-kernel of ``w`` (flipped and transposed), so the work is the useful work of a transposed
    convolution, with no multiplications by inserted zeros. The class outputs are interleaved at the end.
    ``bf16``: the correlations round ``dz`` and the weights to bfloat16 (bfloat16 training).
    """
    ndim = dz.ndim - 2
    kernel = w.shape[:ndim]
    spatial = x_shape[1:-1]
    cin = w.shape[-2]
    blocks = -(-np.asarray(spatial) // np.asarray(stride))  # outputs per residue class, padded to equal size
    zero_bias = jnp.zeros((cin,), dz.dtype)
    wt = jnp.swapaxes(w, -1, -2)  # (..., C_out, C_in): dz's channels in, x's channels out
    outs = []
    for residue in np.ndindex(*stride):
        per_axis = [_phase_taps(k, s, p[0], r) for k, s, p, r in zip(kernel, stride, padding, residue)]
        sub_shape = tuple(len(taps) for taps, _ in per_axis)
        sub = jnp.zeros((*sub_shape, wt.shape[-2], cin), dz.dtype)
        for index in np.ndindex(*sub_shape):
            taps = [per_axis[a][0][index[a]] for a in range(ndim)]
            if None not in taps:
                sub = sub.at[index].set(wt[tuple(taps)])
        # A class whose first tap lands past dz's start (d_min > 0, e.g. kernel 2, stride 2, padding 1) reads
        # dz from d_min on: cropped here, since the kernel takes no negative padding.
        start = tuple(max(-lo, 0) for _, lo in per_axis)
        dz_r = dz[(slice(None), *(slice(s0, None) for s0 in start))] if any(start) else dz
        pads = tuple((max(lo, 0), 0) for _, lo in per_axis)
        outs.append(
            _native_forward(dz_r, sub, zero_bias, (1,) * ndim, pads, None, out_spatial=tuple(blocks), bf16=_bf16_for(sub, bf16))
        )
    # outs[residue] holds x[s * m + r]; interleave (B, m..., C) blocks into (B, m0, s0, m1, s1, ..., C).
    stacked = jnp.stack(outs, axis=0).reshape(*stride, dz.shape[0], *blocks, cin)
    order = [ndim] + [a for i in range(ndim) for a in (ndim + 1 + i, i)] + [2 * ndim + 1]
    full = jnp.transpose(stacked, order).reshape(dz.shape[0], *(blocks * np.asarray(stride)), cin)
    return full[(slice(None), *(slice(0, n) for n in spatial))]


# --- dispatch -----------------------------------------------------------------------------------------


def _use_native(x) -> bool:
    # an empty input (no channels, or a spatial size of 0) has nothing for a kernel to do: lax returns its zeros
    return x.dtype == jnp.float32 and x.size > 0 and native.available()


def _on_cpu(native_fn, reference_fn, *args):
    """Runs ``native_fn`` when lowering for CPU, ``reference_fn`` on any other platform."""
    return lax.platform_dependent(*args, cpu=native_fn, default=reference_fn)


def _forward(x, w, b, stride, padding, negative_slope, bf16=False):
    """``bf16``: asked for bfloat16 (inference or training); :func:`_bf16_for` decides per layer."""

    def reference(x, w, b):
        return _activate(_lax_conv(x, w, stride, padding) + b, negative_slope)

    if not _use_native(x):
        return reference(x, w, b)
    native_fn = functools.partial(
        _native_forward, stride=stride, padding=padding, negative_slope=negative_slope, bf16=_bf16_for(w, bf16)
    )
    return _on_cpu(native_fn, reference, x, w, b)


def _input_grad(dz, w, x_shape, stride, padding, bf16=False):
    """The input gradient: a native forward convolution of ``dz`` with flipped, transposed weights (polyphase
    for strides); ``bf16`` (bfloat16 training) rounds ``dz`` and the weights to bfloat16, float32 sums."""
    ndim = dz.ndim - 2
    kernel_shape = w.shape[:ndim]

    def reference(dz, w):
        _, vjp = jax.vjp(lambda xx: _lax_conv(xx, w, stride, padding), jnp.zeros(x_shape, dz.dtype))
        return vjp(dz)[0]

    if not _use_native(dz):
        return reference(dz, w)

    def native_fn(dz, w):
        if any(s != 1 for s in stride):
            return _native_input_grad_strided(dz, w, x_shape, stride, padding, bf16)
        zero_bias = jnp.zeros((w.shape[-2],), dz.dtype)
        tpad = _transposed_padding(kernel_shape, padding)
        wt = _flip_transpose(w)
        return _native_forward(dz, wt, zero_bias, stride, tpad, None, bf16=_bf16_for(wt, bf16))

    return _on_cpu(native_fn, reference, dz, w)


def _weight_grad(x, dz, kernel_shape, stride, padding):
    def reference(x, dz):
        w0 = jnp.zeros((*kernel_shape, x.shape[-1], dz.shape[-1]), x.dtype)
        _, vjp = jax.vjp(lambda ww: _lax_conv(x, ww, stride, padding), w0)
        return vjp(dz)[0]

    if not _use_native(x):
        return reference(x, dz)
    native_fn = functools.partial(_native_weight_grad, kernel_shape=kernel_shape, stride=stride, padding=padding)
    return _on_cpu(native_fn, reference, x, dz)


# ``train_bf16``: the value of :func:`bf16_training` where the call was traced (static, so caches tell them apart)
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _conv(x, w, b, stride, padding, negative_slope, train_bf16):
    # not differentiated: inference, or a frozen network inside a train step
    return _forward(x, w, b, stride, padding, negative_slope, bf16=train_bf16 or bf16_inference())


def _conv_fwd(x, w, b, stride, padding, negative_slope, train_bf16):
    y = _forward(x, w, b, stride, padding, negative_slope, bf16=train_bf16)
    return y, (x, w, y if negative_slope is not None else None)


def _conv_bwd(stride, padding, negative_slope, train_bf16, residuals, dy):
    x, w, y = residuals
    ndim = x.ndim - 2
    dz = dy if negative_slope is None else jnp.where(y >= 0, dy, negative_slope * dy)
    db = jnp.sum(dz, axis=tuple(range(ndim + 1)))
    dw = _weight_grad(x, dz, w.shape[:ndim], stride, padding)
    dx = _input_grad(dz, w, x.shape, stride, padding, bf16=train_bf16)
    return dx, dw.astype(w.dtype), db.astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array,
    stride: IntOrSeq = 1,
    padding: Optional[Padding] = None,
    negative_slope: Optional[float] = None,
) -> jax.Array:
    """``act(conv(x, w) + b)`` for channels-last 2-D ``(B, H, W, C)`` or 3-D ``(B, D, H, W, C)`` input.

    Args:
      x: input, channels last.
      w: kernel ``(*k, C_in, C_out)`` (HWIO / DHWIO).
      b: bias ``(C_out,)``.
      stride: int or per-axis tuple.
      padding: per-axis ``(low, high)`` zero padding; default ``k // 2`` on both sides, so a stride-2
        3x3 convolution samples input ``2o - 1, 2o, 2o + 1`` exactly like PyTorch's ``padding=1``.
      negative_slope: LeakyReLU slope (> 0) applied after the bias, or None for no activation.
    """
    ndim = x.ndim - 2
    if ndim not in (2, 3) or w.ndim != ndim + 2:
        raise ValueError(f"conv expects 2-D or 3-D channels-last input and a matching kernel, got {x.shape}, {w.shape}")
    _check_slope(negative_slope)
    padding = default_padding(w.shape[:ndim]) if padding is None else tuple(tuple(int(v) for v in p) for p in padding)
    slope = None if negative_slope is None else float(negative_slope)
    return _conv(x, w, b, _tuple(stride, ndim), padding, slope, _training_bf16.get())


# --- the decoder's conv(concat([upsample_nearest(low), skip])) ----------------------------------------


def _upsampled_concat(low, skip):
    return jnp.concatenate([upsample_nearest(low, skip.shape[1:-1]), skip], axis=-1)


def _native_upcat_forward(low, skip, w, b, padding, negative_slope, bf16=False):
    squeeze = skip.ndim == 4
    low5 = low[:, None] if squeeze else low
    skip5, w5, _, padding5 = _as_3d(skip, w, (1,) * (skip.ndim - 2), padding)
    out = jax.ShapeDtypeStruct((*skip5.shape[:4], w5.shape[-1]), jnp.float32)
    y = jax.ffi.ffi_call("crd_conv_upcat_fwd", out, vmap_method="sequential")(
        low5,
        skip5,
        _packed_weights(w5, bf16),
        b,
        pd=np.int64(padding5[0][0]),
        ph=np.int64(padding5[1][0]),
        pw=np.int64(padding5[2][0]),
        slope=np.float32(0.0 if negative_slope is None else negative_slope),
        act=np.int64(negative_slope is not None),
        bf16=np.int64(bf16),
    )
    return y[:, 0] if squeeze else y


def _upcat_forward(low, skip, w, b, padding, negative_slope, bf16=False):
    stride = (1,) * (skip.ndim - 2)

    def reference(low, skip, w, b):
        return _activate(_lax_conv(_upsampled_concat(low, skip), w, stride, padding) + b, negative_slope)

    native_fn = functools.partial(_native_upcat_forward, padding=padding, negative_slope=negative_slope, bf16=_bf16_for(w, bf16))
    return _on_cpu(native_fn, reference, low, skip, w, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _upcat_conv(low, skip, w, b, padding, negative_slope, train_bf16):
    return _upcat_forward(low, skip, w, b, padding, negative_slope, bf16=train_bf16 or bf16_inference())


def _upcat_conv_fwd(low, skip, w, b, padding, negative_slope, train_bf16):
    y = _upcat_forward(low, skip, w, b, padding, negative_slope, bf16=train_bf16)
    return y, (low, skip, w, y if negative_slope is not None else None)


#: :func:`upcat_backward`'s modes, newest first (``"coarse"`` and ``"coarse_split"`` measured within noise of each
#: other on VM's finest level; benchmarks/results/upcat_backward_wgrad.md; ``"coarse"`` against
#: ``"coarse_fused_skip"``: benchmarks/results/upcat_backward_skip.md)
UPCAT_BACKWARDS = ("coarse", "coarse_fused_skip", "coarse_split", "coarse_direct", "concat")


def upcat_backward(mode: Optional[str] = None) -> str:
    """How :func:`conv_upsampled_concat`'s backward pass runs on the native path. ``"coarse"`` (the default): where
    the skip is exactly twice the coarse grid, the upsampled channels' gradients come from the coarse grid and
    the skip's input gradient is a plain convolution's (left out by XLA where the skip needs no gradient, as for
    the image pair); nothing of the concatenation's size is stored. The input gradient is the fine grid's, each 2x2x2 block summed,
    in one Winograd pass that computes only the 27 of 64 products the sums need (:func:`_pooled_input_grad`; 3^3
    kernels, AVX-512), else a stride-2 correlation on the coarse grid (:func:`_coarse_upsampled_grads`). The
    weight gradient of both inputs is one Winograd pass that reads the upsampled channels on their coarse grid
    (:func:`_upcat_weight_grad`, where :func:`_upcat_wgrad_fused_applies`), else the coarse correlation's plus the
    skip's own; a skip of at most ``_SKIP_APART_MAX`` channels (the image pair beside the finest level) takes its
    weight gradient apart, as the direct kernel. ``"coarse_fused_skip"``: such a skip inside the Winograd pass too
    (the earlier way). ``"coarse_split"``: the two weight gradients apart; ``"coarse_direct"``: that and
    the coarse correlation for the input gradient too (benchmarks compare them). ``"concat"``: the concatenation is
    materialised and differentiated as one convolution. ``mode`` sets it for this process (read when a function is
    traced); returns the mode in use."""
    if mode is not None:
        if mode not in UPCAT_BACKWARDS:
            raise ValueError(f"upcat backward must be one of {', '.join(map(repr, UPCAT_BACKWARDS))}, not {mode!r}")
        _settings["upcat_backward"] = mode
    return _settings.setdefault("upcat_backward", "coarse")


def coarse_tap_matrix(k: int) -> np.ndarray:
    """``M`` of shape ``(k + 1, k)``, per axis: ``M[j, t] = 1`` where tap ``j`` of the stride-2 correlation on the
    coarse grid collects tap ``t`` of the ``k``-tap kernel applied to the nearest-upsampled grid.

    With ``x = up(low)`` (``x[v] = low[v // 2]``) and padding ``p``, ``y[o] = sum_t x[o + t - p] w[t]``; so
    ``dlow[c] = sum_{a in {0,1}, t} w[t] dz[2c + a - t + p]``. Writing ``2c + a - t + p = 2c - p' + j`` with
    ``p' = k - 1 - p`` gives ``j = a - t + k - 1`` in ``0..k``: ``dlow`` is a stride-2 correlation of ``dz`` with the
    ``k + 1`` taps ``W'[j] = sum_t M[j, t] w[t]^T`` (low padding ``p'``), and ``dw[t] = sum_j M[j, t] G[j]^T`` with
    ``G[j] = sum_c dz[2c - p' + j] low[c]^T``, the weight gradient of that correlation.
    """
    m = np.zeros((k + 1, k), np.float32)
    for j in range(k + 1):
        for a in (0, 1):
            t = a + k - 1 - j
            if 0 <= t < k:
                m[j, t] = 1.0
    return m


def _coarse_fits(low, skip) -> bool:
    return all(2 * l == s for l, s in zip(low.shape[1:-1], skip.shape[1:-1]))


def _pooled_winograd_applies(low, dz, w_low, padding, bf16) -> bool:
    """Whether the upsampled channels' input gradient runs as ``csrc/ffi_glue.cc: ConvPooledT`` (Winograd with the
    outputs of each 2x2x2 tile summed): 3-D, a 3^3 kernel with padding 1, float32 (not bfloat16 training), the
    low channels a multiple of 16, the layer's output channels (this pass's input) from
    :func:`crd_jax.ops.native.winograd_min_input_channels` to 128, and the Winograd path on (AVX-512). Decided
    when the gradient is traced, so a threshold set later applies to functions compiled after it."""
    from crd_jax.ops import native

    return (
        low.ndim == 5
        and tuple(w_low.shape[:3]) == (3, 3, 3)
        and tuple(tuple(p) for p in padding) == ((1, 1),) * 3
        and not bf16
        and low.shape[-1] % 16 == 0
        and native.winograd_min_input_channels() <= dz.shape[-1] <= 128
        and dz.dtype == jnp.float32
        and upcat_backward() in ("coarse", "coarse_fused_skip", "coarse_split")
        and native.winograd()
    )


def _pooled_input_grad(dz, w_low, low_shape):
    """``d low = pool(conv^T(dz))``: the convolution's input gradient on the fine grid (flipped, transposed weights),
    each 2x2x2 block summed onto the coarse voxel it was upsampled from, in one native Winograd pass that computes
    only the 27 of 64 products the sums need (27 instead of the coarse correlation's 64 multiply-adds per coarse
    voxel and channel pair)."""
    out = jax.ShapeDtypeStruct(low_shape, jnp.float32)
    return jax.ffi.ffi_call("crd_conv_pooled_t", out, vmap_method="sequential")(dz, _flip_transpose(w_low))


def _coarse_upsampled_grads(low, dz, w_low, padding, bf16=False, weight_grad=True):
    """Input and weight gradients of ``conv(up(low), w_low)`` (stride 1, the skip exactly twice ``low``'s grid)
    from the coarse grid: see :func:`coarse_tap_matrix`. One native stride-2 correlation (``(k+1)^d`` taps on
    ``low``'s grid: ``(k+1)^d / (2^d k^d)`` of the fine work, 0.30 for 3^3) and one native weight gradient of the
    same size; ``lax`` on other platforms. ``bf16``: the correlation (an input gradient) in bfloat16.
    ``weight_grad=False``: the input gradient only (the weight gradient is ``None``)."""
    ndim = low.ndim - 2
    kernel = w_low.shape[:ndim]
    mats = [jnp.asarray(coarse_tap_matrix(k)) for k in kernel]
    coarse_pad = tuple((k - 1 - lo, k - 1 - lo) for k, (lo, _) in zip(kernel, padding))
    letters = "abc"[:ndim]
    fine = "def"[:ndim]

    def reference(low, dz, w_low):
        def f(low, w_low):
            up = upsample_nearest(low, dz.shape[1:-1])
            return _lax_conv(up, w_low, (1,) * ndim, padding)

        _, vjp = jax.vjp(f, low, w_low)
        dlow, dw = vjp(dz)
        return (dlow, dw) if weight_grad else dlow

    def native_fn(low, dz, w_low):
        if _pooled_winograd_applies(low, dz, w_low, padding, bf16):
            dlow = _pooled_input_grad(dz, w_low, low.shape)
        else:
            # W'[j] = sum_t M[j, t] w[t]^T: dz's channels in, low's channels out
            spec = ",".join(f"{a}{t}" for a, t in zip(letters, fine)) + f",{fine}io->{letters}oi"
            w_coarse = jnp.einsum(spec, *mats, w_low)
            zero_bias = jnp.zeros((w_low.shape[-2],), dz.dtype)
            dlow = _native_forward(
                dz,
                w_coarse,
                zero_bias,
                (2,) * ndim,
                coarse_pad,
                None,
                out_spatial=low.shape[1:-1],
                bf16=_bf16_for(w_coarse, bf16),
            )
        if not weight_grad:
            return dlow
        g = _native_weight_grad(dz, low, tuple(k + 1 for k in kernel), (2,) * ndim, coarse_pad)  # (..., Co, Ci_low)
        spec = ",".join(f"{a}{t}" for a, t in zip(letters, fine)) + f",{letters}oi->{fine}io"
        return dlow, jnp.einsum(spec, *mats, g)

    out = _on_cpu(native_fn, reference, low, dz, w_low)
    return out if weight_grad else (out, None)


def _upcat_wgrad_fused_applies(low, skip, w, dz, padding) -> bool:
    """Whether the whole weight gradient of the decoder step runs as one native Winograd pass
    (``csrc/ffi_glue.cc: ConvWgradUpcat`` -> ``conv_wgrad_winograd_avx512.cc: WinogradWeightGradUpcat``): 3-D, a 3^3
    kernel with padding 1, the skip exactly twice ``low``'s grid, float32, ``low``'s channels a multiple of 16, at
    most 64 input and 8 to 64 output channels, the Winograd weight gradient selected (``native.wgrad()`` "auto" or
    "winograd") on AVX-512, a fine grid of at least 16^3 voxels, 4 along every axis, and at least as many planes of
    tiles (batch x depth / 2) as threads (where the Winograd weight gradient measured faster than the direct
    kernels: ``conv_wgrad_avx2.cc: WinogradWgradWins``)."""
    spatial = skip.shape[1:-1]
    return (
        skip.ndim == 5
        and tuple(w.shape[:3]) == (3, 3, 3)
        and tuple(tuple(p) for p in padding) == ((1, 1),) * 3
        and _coarse_fits(low, skip)
        and low.dtype == skip.dtype == dz.dtype == jnp.float32
        and low.shape[-1] % 16 == 0
        and w.shape[-2] <= 64
        and 8 <= w.shape[-1] <= 64
        and min(spatial) >= 4
        and int(np.prod(spatial)) >= 16**3
        and skip.shape[0] * spatial[0] // 2 >= native.threads()
        and upcat_backward() in ("coarse", "coarse_fused_skip")
        and native.isa() == "avx512"
        and native.wgrad() in ("auto", "winograd")
    )


#: skips of at most this many channels take their weight gradient apart from the fused Winograd pass
_SKIP_APART_MAX = 4


def _upcat_weight_grad(low, skip, dz):
    """``dw`` of ``conv(concat(up(low), skip), w)`` (3^3, padding 1) without the concatenation: one native pass in
    the Winograd domain, the upsampled channels on their coarse grid (27 of 64 products per tile), the gradient
    transform of ``dz`` shared by both inputs; ``lax`` of the concatenation on other platforms."""
    cin = low.shape[-1] + skip.shape[-1]
    native.available()  # registers the kernels' FFI targets (a direct call may come before any other native op)

    def reference(low, skip, dz):
        return _weight_grad(_upsampled_concat(low, skip), dz, (3, 3, 3), (1, 1, 1), ((1, 1),) * 3)

    def native_fn(low, skip, dz):
        out = jax.ShapeDtypeStruct((3, 3, 3, cin, dz.shape[-1]), jnp.float32)
        return jax.ffi.ffi_call("crd_conv_wgrad_upcat", out, vmap_method="sequential")(low, skip, dz)

    return _on_cpu(native_fn, reference, low, skip, dz)


def _upcat_conv_bwd(padding, negative_slope, train_bf16, residuals, dy):
    low, skip, w, y = residuals
    ndim = skip.ndim - 2
    stride = (1,) * ndim
    if upcat_backward() == "concat" or not _coarse_fits(low, skip):
        # The weight gradient needs the concatenated input: materialised here (an odd skip size crops the
        # upsampled grid, which the coarse formulation does not model).
        x, concat_vjp = jax.vjp(_upsampled_concat, low, skip)
        dx, dw, db = _conv_bwd(stride, padding, negative_slope, train_bf16, (x, w, y), dy)
        dlow, dskip = concat_vjp(dx)
        return dlow, dskip, dw, db
    dz = dy if negative_slope is None else jnp.where(y >= 0, dy, negative_slope * dy)
    db = jnp.sum(dz, axis=tuple(range(ndim + 1)))
    cl = low.shape[-1]
    w_low, w_skip = w[..., :cl, :], w[..., cl:, :]
    fused = _upcat_wgrad_fused_applies(low, skip, w, dz, padding)
    dlow, dw_low = _coarse_upsampled_grads(low, dz, w_low, padding, bf16=train_bf16, weight_grad=not fused)
    dskip = _input_grad(dz, w_skip, skip.shape, stride, padding, bf16=train_bf16)  # dropped by XLA when the skip is data
    # A skip of a few channels (the image pair beside the finest decoder level) would fill a whole 16-lane group of
    # the Winograd transforms and a cache line of U per position for 2 useful floats: its weight gradient runs
    # apart, as the direct kernel (few input channels are its fast case), and the fused pass sees ``low`` alone
    skip_apart = not fused or (skip.shape[-1] <= _SKIP_APART_MAX and upcat_backward() == "coarse")
    if fused and not skip_apart:
        dw = _upcat_weight_grad(low, skip, dz)
    else:
        if fused:
            dw_low = _upcat_weight_grad(low, skip[..., :0], dz)
        dw_skip = _weight_grad(skip, dz, w.shape[:ndim], stride, padding)
        dw = jnp.concatenate([dw_low, dw_skip], axis=-2)
    return dlow, dskip, dw.astype(w.dtype), db.astype(w.dtype)


_upcat_conv.defvjp(_upcat_conv_fwd, _upcat_conv_bwd)


def conv_upsampled_concat(
    low: jax.Array,
    skip: jax.Array,
    w: jax.Array,
    b: jax.Array,
    negative_slope: Optional[float] = None,
) -> jax.Array:
    """``conv(concat([upsample_nearest(low, skip's size), skip]), w, b)``, stride 1, padding ``k // 2``.

    The U-Net decoder's step (VoxelMorph's ``h = conv(concat(up(h), skip))``): ``low`` is ``(B, *s, C_l)``
    with ``s`` at least half the skip's spatial size ``(B, *S, C_s)``; ``w`` is ``(*k, C_l + C_s, C_out)``.
    Equal to :func:`conv` of the concatenation (tested against it); on the native CPU kernel the
    concatenation is never stored.
    """
    ndim = skip.ndim - 2
    if low.ndim != skip.ndim or w.ndim != ndim + 2 or w.shape[-2] != low.shape[-1] + skip.shape[-1]:
        raise ValueError(f"conv_upsampled_concat: shapes {low.shape}, {skip.shape}, {w.shape} do not fit")
    if any(2 * l < s for l, s in zip(low.shape[1:-1], skip.shape[1:-1])) or low.shape[0] != skip.shape[0]:
        raise ValueError(f"conv_upsampled_concat: {low.shape} upsampled x2 does not cover {skip.shape}")
    _check_slope(negative_slope)
    padding = default_padding(w.shape[:ndim])
    slope = None if negative_slope is None else float(negative_slope)
    if not (_use_native(skip) and low.dtype == jnp.float32):
        return conv(_upsampled_concat(low, skip), w, b, padding=padding, negative_slope=slope)
    return _upcat_conv(low, skip, w, b, padding, slope, _training_bf16.get())
