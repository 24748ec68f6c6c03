"""Spatial transforms on channels-last arrays, N-d generic (2-D and 3-D).

Conventions (used everywhere in crd-jax):

* Images are ``(B, *spatial, C)``; displacement fields are ``(B, *spatial, ndim)``.
* A displacement is measured in voxels of the grid it lives on; channel ``k`` moves along array axis ``k``
  (``ij`` indexing, as VoxelMorph and Learn2Reg).
* Warping pulls: ``warp(image, u)(x) = image(x + u(x))`` (backward warping).
* Resampling between grids uses **half-pixel centres**: voxel ``i`` of an ``n``-voxel axis covers
  ``[i, i + 1)`` in continuous units, so a point at index ``x_low`` on a grid ``s`` times coarser sits at
  ``x_high = s * (x_low + 0.5) - 0.5``. Under this convention a displacement of ``c`` low-resolution voxels
  is exactly ``s * c`` high-resolution voxels, which is why :func:`upsample_field` multiplies by the
  factor. It is PyTorch's ``interpolate(..., align_corners=False)`` (the authors' student uses it).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy import ndimage
from jax.typing import DTypeLike

_MODES = {"border": "nearest", "zeros": "constant", "reflect": "mirror"}
_settings: dict = {}  # per-process choices of formulation (warp_gradient, upsample_vjp)


def upsample_nearest(x: jax.Array, shape: Sequence[int]) -> jax.Array:
    """Nearest-neighbour x2 upsampling of ``(B, *spatial, C)``, cropped to ``shape`` (for odd sizes)."""
    ndim = x.ndim - 2
    for axis in range(1, ndim + 1):
        x = jnp.repeat(x, 2, axis=axis)
    return x[(slice(None), *(slice(0, s) for s in shape), slice(None))]


def identity_grid(shape: Sequence[int], dtype: DTypeLike = jnp.float32) -> jax.Array:
    """Voxel coordinates of a grid, ``(*shape, ndim)``; channel k is the index along axis k."""
    axes = [jnp.arange(n, dtype=dtype) for n in shape]
    return jnp.stack(jnp.meshgrid(*axes, indexing="ij"), axis=-1)


def _check_field(image: jax.Array, disp: jax.Array) -> int:
    ndim = disp.shape[-1]
    if disp.ndim != ndim + 2:
        raise ValueError(f"displacement must be (B, *spatial, ndim) with ndim = its last axis, got {disp.shape}")
    if image.ndim != ndim + 2 or image.shape[0] != disp.shape[0]:
        raise ValueError(f"image {image.shape} does not match displacement {disp.shape} (batch, rank)")
    return ndim


def warp(image: jax.Array, disp: jax.Array, order: int = 1, mode: str = "border") -> jax.Array:
    """Samples ``image`` at ``x + disp(x)`` for every voxel ``x`` of the displacement's grid.

    Built on ``jax.scipy.ndimage.map_coordinates``: ``order=1`` is (bi/tri)linear for intensities and
    fields, ``order=0`` nearest neighbour for label maps. ``mode``: ``"border"`` repeats the edge voxel
    (the authors' code and VoxelMorph's fields), ``"zeros"`` reads zeros outside, ``"reflect"`` mirrors.

    Args:
      image: ``(B, *spatial_in, C)``.
      disp: ``(B, *spatial_out, ndim)`` in voxels of ``image``'s grid.
    Returns:
      ``(B, *spatial_out, C)``.
    """
    ndim = _check_field(image, disp)
    if order not in (0, 1):
        raise ValueError(f"order must be 0 or 1, got {order}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {sorted(_MODES)}, got {mode!r}")
    if (
        order == 1
        and mode == "border"
        and ndim == 3
        and image.dtype == disp.dtype == jnp.float32
        and warp_gradient() != "xla"
        and _native_available()
    ):
        if warp_gradient() == "regather":
            return _warp_linear_border(image, disp)
        return _warp_saving_jacobian(image, disp)
    return _warp_reference(image, disp, order, mode)


def _native_available() -> bool:
    from crd_jax.ops import native

    return native.available()


def warp_gradient(mode: Optional[str] = None) -> str:
    """How :func:`warp` runs for 3-D float32 linear warps in ``"border"`` mode (every training loss's): ``"native"``
    (default where the native kernels are built): ``csrc/warp_linear_cpu.cc`` samples the whole channels-last batch
    and, where the warp is differentiated, also writes the sampled image's derivative with respect to the position
    (three floats a voxel), so the gradient with respect to the displacement is an elementwise product XLA fuses;
    ``"regather"``: the previous native pair, ``csrc/warp_cpu.cc``'s sampling and ``csrc/warp_grad_cpu.cc``'s
    gradient, a second pass that reads the eight corners again (kept for comparison; equal values); ``"xla"``:
    ``map_coordinates`` and its autodiff throughout (the native gradient has no derivative of its own: second
    derivatives of a warp need ``"xla"``). The image's gradient, needed only where the image itself is
    differentiated, is XLA's in every mode. ``mode`` sets it for this process (read when a function is traced);
    returns the mode in use."""
    if mode is not None:
        if mode not in ("native", "regather", "xla"):
            raise ValueError(f"warp gradient must be 'native', 'regather' or 'xla', not {mode!r}")
        _settings["warp_gradient"] = mode
    from crd_jax.ops import native

    return native.in_use(_settings.setdefault("warp_gradient", "native"), "xla")


def _warp_reference(image: jax.Array, disp: jax.Array, order: int = 1, mode: str = "border") -> jax.Array:
    """:func:`warp` with ``map_coordinates`` (XLA's gathers) and JAX's autodiff."""
    ndim = disp.shape[-1]
    grid = identity_grid(disp.shape[1:-1], disp.dtype)

    def one(img, d):
        coords = jnp.moveaxis(grid + d, -1, 0)
        coords = [coords[k] for k in range(ndim)]
        sample = lambda ch: ndimage.map_coordinates(ch, coords, order=order, mode=_MODES[mode], cval=0.0)
        return jax.vmap(sample, in_axes=-1, out_axes=-1)(img)

    if order == 0 and not jnp.issubdtype(image.dtype, jnp.floating):
        # map_coordinates rounds integer outputs through float; labels beyond 2^24 would be unsafe.
        return jax.vmap(one)(image.astype(jnp.float32), disp).astype(image.dtype)
    return jax.vmap(one)(image, disp)


def _native_warp(image, disp):
    """``(B, *in, C)`` sampled at ``x + disp`` by the native kernel, one call per batch element and channel."""

    def volume(img, d):
        out = jax.ShapeDtypeStruct(d.shape[:-1], jnp.float32)
        return jax.ffi.ffi_call("crd_warp", out, vmap_method="sequential")(img, d, order=np.int64(1))

    return jax.vmap(jax.vmap(volume, in_axes=(-1, None), out_axes=-1))(image, disp)


def _native_warp_disp_grad(image, disp, g):
    """``sum_c g_c * d image_c(x + disp) / d disp`` by the native kernel, ``(B, *out, 3)``."""

    def volume(img, d, gc):
        out = jax.ShapeDtypeStruct(d.shape, jnp.float32)
        return jax.ffi.ffi_call("crd_warp_grad", out, vmap_method="sequential")(img, d, gc)

    per_channel = jax.vmap(volume, in_axes=(-1, None, -1), out_axes=0)
    return jax.vmap(lambda img, d, gc: jnp.sum(per_channel(img, d, gc), axis=0))(image, disp, g)


@jax.custom_vjp
def _warp_linear_border(image, disp):
    return lax.platform_dependent(image, disp, cpu=_native_warp, default=_warp_reference)


def _warp_linear_border_fwd(image, disp):
    return _warp_linear_border(image, disp), (image, disp)


def _warp_linear_border_bwd(residuals, g):
    image, disp = residuals

    def reference_disp(image, disp, g):
        return jax.vjp(lambda d: _warp_reference(image, d), disp)[1](g)[0]

    ddisp = lax.platform_dependent(image, disp, g, cpu=_native_warp_disp_grad, default=reference_disp)
    # the image's cotangent (a scatter-add): XLA drops it where the image is not differentiated (training's
    # moving image); composing fields (scaling and squaring) needs it
    dimage = jax.vjp(lambda im: _warp_reference(im, disp), image)[1](g)[0]
    return dimage, ddisp


_warp_linear_border.defvjp(_warp_linear_border_fwd, _warp_linear_border_bwd)


def _native_warp_linear(image, disp, jacobian: bool):
    """``(B, *out, C)`` sampled by ``csrc/warp_linear_cpu.cc`` in one call, and (``jacobian``) the sampled image's
    derivative with respect to the position, ``(B, *out, C, 3)``."""
    out = jax.ShapeDtypeStruct((*disp.shape[:-1], image.shape[-1]), jnp.float32)
    jac = jax.ShapeDtypeStruct((*out.shape, 3) if jacobian else (0,), jnp.float32)
    return jax.ffi.ffi_call("crd_warp_linear", (out, jac), vmap_method="sequential")(image, disp)


@jax.custom_vjp
def _warp_saving_jacobian(image, disp):
    # not differentiated (evaluation): warp_cpu.cc's sampling, as "regather" (measured ~10% faster than the
    # batched kernel without its derivative)
    return lax.platform_dependent(image, disp, cpu=_native_warp, default=_warp_reference)


def _warp_saving_jacobian_fwd(image, disp):
    def elsewhere(image, disp):  # another platform in the same trace: the reference, no derivative saved
        return _warp_reference(image, disp), jnp.zeros((*disp.shape[:-1], image.shape[-1], 3), jnp.float32)

    y, jac = lax.platform_dependent(image, disp, cpu=lambda i, d: _native_warp_linear(i, d, True), default=elsewhere)
    return y, (image, disp, jac)


def _warp_saving_jacobian_bwd(residuals, g):
    image, disp, jac = residuals

    def reference_disp(image, disp, jac, g):
        return jax.vjp(lambda d: _warp_reference(image, d), disp)[1](g)[0]

    def native_disp(image, disp, jac, g):  # sum over channels of g * d image_c / d position
        return jnp.sum(g[..., None] * jac, axis=-2)

    ddisp = lax.platform_dependent(image, disp, jac, g, cpu=native_disp, default=reference_disp)
    dimage = jax.vjp(lambda im: _warp_reference(im, disp), image)[1](g)[0]
    return dimage, ddisp


_warp_saving_jacobian.defvjp(_warp_saving_jacobian_fwd, _warp_saving_jacobian_bwd)


_NATIVE_SAMPLE_TYPES = ("float32", "int8", "uint8", "int16", "uint16", "int32", "uint32")


def sampled_natively(dtype: DTypeLike, ndim: int) -> bool:
    """Whether :func:`sample_volume` runs the native kernel for an image of ``dtype`` in ``ndim`` dimensions
    (3-D, a type it takes, JAX on the CPU with the kernels built)."""
    from crd_jax.ops import native

    return ndim == 3 and jnp.dtype(dtype).name in _NATIVE_SAMPLE_TYPES and native.available()


def sample_volume(image: jax.Array, disp: jax.Array, order: int = 1) -> jax.Array:
    """``image (*in)`` sampled at ``x + disp(x)`` for every voxel ``x`` of ``disp (*out, ndim)``, edge voxels
    repeated outside: ``jax.scipy.ndimage.map_coordinates(image, x + disp, order, mode="nearest")``, unbatched,
    one channel (what ``crd-jax register`` applies to a full-size volume).

    ``order=1``: linear, float32 out; ``order=0``: nearest, the image's type kept (an integer label map is
    copied, never rounded through float; values beyond 2^24 stay exact). On the CPU a 3-D volume of float32
    or 8/16/32-bit integers is sampled by the native kernel (``csrc/warp_cpu.cc``) in one pass with no
    temporaries (XLA's gathers materialise index arrays; at OASIS size on 2 cores they also took ~1.5x the
    time); elsewhere ``map_coordinates``. Not differentiable (inference only; training warps with :func:`warp`).
    """
    ndim = disp.shape[-1]
    if image.ndim != ndim or disp.ndim != ndim + 1:
        raise ValueError(f"image {image.shape} and displacement {disp.shape}: expected (*in) and (*out, {ndim})")
    if order not in (0, 1):
        raise ValueError(f"order must be 0 or 1, got {order}")
    disp = disp.astype(jnp.float32)
    if order == 1:
        image = image.astype(jnp.float32)

    def reference(image, disp):
        grid = jnp.meshgrid(*(jnp.arange(n, dtype=disp.dtype) for n in disp.shape[:-1]), indexing="ij")
        coords = [grid[k] + disp[..., k] for k in range(ndim)]
        return ndimage.map_coordinates(image, coords, order=order, mode="nearest").astype(image.dtype)

    if not sampled_natively(image.dtype, ndim):
        return reference(image, disp)

    def native_fn(image, disp):
        out = jax.ShapeDtypeStruct(disp.shape[:-1], image.dtype)
        return jax.ffi.ffi_call("crd_warp", out, vmap_method="sequential")(image, disp, order=np.int64(order))

    return lax.platform_dependent(image, disp, cpu=native_fn, default=reference)


def upsample_vjp(mode: Optional[str] = None) -> str:
    """How the linear upsampling by whole factors (:func:`upsample_field`, :func:`resize` by whole factors) and its
    gradient run: ``"native"`` (default where the native kernels are built, for float32 2-D and 3-D arrays):
    ``csrc/upsample_linear_cpu.cc`` writes the upsampled array in one pass and its transpose gathers the cotangent
    in one pass (XLA fused the stencils into each consumer of the full-resolution field and recomputed them per
    use: a low-resolution model's loss at 128^3 took ~2.5x the same loss on a given field); ``"stencil"``, XLA's
    stencil of slices per axis with its transpose written out (:func:`_upsample_axis_transpose`; the path on other
    platforms, and the one forward-mode autodiff of a gradient needs: the native pair, each the other's
    transpose, gives gradients of gradients, not ``jax.jvp``);
    ``"autodiff"``, the stencil with JAX's transpose of the forward (the edge padding's transpose compiled to ~30
    separate padded copies on XLA:CPU: 12x the forward's time at 128^3, measured). ``mode`` sets it for this
    process (read when a function is traced); returns the mode in use."""
    if mode is not None:
        if mode not in ("native", "stencil", "autodiff"):
            raise ValueError(f"upsample vjp must be 'native', 'stencil' or 'autodiff', not {mode!r}")
        _settings["upsample_vjp"] = mode
    from crd_jax.ops import native

    return native.in_use(_settings.setdefault("upsample_vjp", "native"), "stencil")


def _upsample_offsets(k: int):
    """Output ``k i + r`` samples ``i + o_r``, ``o_r = (r + 0.5) / k - 0.5``."""
    return [(r + 0.5) / k - 0.5 for r in range(k)]


def _upsample_axis_stencil(x: jax.Array, axis: int, k: int) -> jax.Array:
    """Half-pixel linear upsampling by an integer factor as a fixed stencil of shifted slices (autodiff's
    reference for :func:`_upsample_axis_integer`).

    Output ``k i + r`` samples ``i + (r + 0.5) / k - 0.5``: a blend of ``x[i]`` with ``x[i - 1]`` or ``x[i + 1]``
    (edge repeated). Slices keep the gradient a cheap stencil too, where a gather's is a scatter-add.
    """
    n = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (1, 1)
    xp = jnp.pad(x, pad, mode="edge")
    prev, cur, nxt = (jax.lax.slice_in_dim(xp, s, s + n, axis=axis) for s in (0, 1, 2))
    parts = []
    for o in _upsample_offsets(k):
        parts.append(cur * (1 + o) - prev * o if o < 0 else cur * (1 - o) + nxt * o)
    out = jnp.stack(parts, axis=axis + 1)
    return out.reshape(*x.shape[:axis], n * k, *x.shape[axis + 1 :])


def _upsample_axis_transpose(g: jax.Array, axis: int, k: int) -> jax.Array:
    """The transpose of :func:`_upsample_axis_stencil` applied to ``g`` (``n k`` along ``axis``, ``n`` out).

    Phase ``r`` of output block ``i`` came from ``x[i]`` with weight ``1 - |o_r|`` and from ``x[i - 1]`` (``o_r < 0``)
    or ``x[i + 1]`` (``o_r > 0``) with weight ``|o_r|``, the edge voxel standing in beyond the ends. So
    ``dx[j] = C[j] + L[j + 1] + R[j - 1]``, with ``C``, ``L``, ``R`` the per-block weighted sums of the phases.
    Padding ``g`` with one mirrored block at each end supplies the edge terms: the offsets are symmetric
    (``o_{k-1-r} = -o_r``), so block ``-1`` read as ``R`` is block ``0`` read as ``L``. One pad, one reshape, three
    sums and two shifted slices, where JAX's transpose of the forward's edge padding compiled to ~30 padded copies.
    """
    n = g.shape[axis] // k
    pad = [(0, 0)] * g.ndim
    pad[axis] = (k, k)
    blocks = jnp.pad(g, pad, mode="symmetric").reshape(*g.shape[:axis], n + 2, k, *g.shape[axis + 1 :])
    offsets = _upsample_offsets(k)

    def weighted(weights):
        total = None
        for r, wr in enumerate(weights):
            if wr:
                term = jax.lax.index_in_dim(blocks, r, axis=axis + 1, keepdims=False) * wr
                total = term if total is None else total + term
        return total

    centre = weighted([1 - abs(o) for o in offsets])
    out = jax.lax.slice_in_dim(centre, 1, n + 1, axis=axis)
    left, right = weighted([-o if o < 0 else 0.0 for o in offsets]), weighted([o if o > 0 else 0.0 for o in offsets])
    if left is not None:
        out = out + jax.lax.slice_in_dim(left, 2, n + 2, axis=axis)
    if right is not None:
        out = out + jax.lax.slice_in_dim(right, 0, n, axis=axis)
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _upsample_axis_custom(x: jax.Array, axis: int, k: int) -> jax.Array:
    return _upsample_axis_stencil(x, axis, k)


def _upsample_custom_fwd(x, axis, k):
    return _upsample_axis_stencil(x, axis, k), None


def _upsample_custom_bwd(axis, k, _, g):
    return (_upsample_axis_transpose(g, axis, k),)


_upsample_axis_custom.defvjp(_upsample_custom_fwd, _upsample_custom_bwd)


def _upsample_axis_integer(x: jax.Array, axis: int, k: int) -> jax.Array:
    """Half-pixel linear upsampling by an integer factor along ``axis`` (edge repeated); its gradient is the
    stencil :func:`_upsample_axis_transpose` unless :func:`upsample_vjp` says ``"autodiff"`` (XLA's path; the
    native one works on all axes at once, :func:`_upsample_native`)."""
    if upsample_vjp() == "autodiff":
        return _upsample_axis_stencil(x, axis, k)
    return _upsample_axis_custom(x, axis, k)


def _downsample_axis_integer(x: jax.Array, axis: int, k: int) -> jax.Array:
    """Half-pixel linear downsampling by an integer factor: output ``i`` samples ``k i + (k - 1) / 2``, the
    middle of its block (the mean of the two central voxels for even ``k``)."""
    size = x.shape[axis] // k
    blocks = x.reshape(*x.shape[:axis], size, k, *x.shape[axis + 1 :])
    take = lambda j: jax.lax.index_in_dim(blocks, j, axis=axis + 1, keepdims=False)  # noqa: E731
    if k % 2:
        return take(k // 2)
    return 0.5 * (take(k // 2 - 1) + take(k // 2))


def _linear_axis(x: jax.Array, axis: int, size: int, align_corners: bool = False) -> jax.Array:
    """Linear resampling of one axis to ``size`` samples, half-pixel centres (or corner-aligned), edge clamped."""
    n = x.shape[axis]
    if n == size:
        return x
    if not align_corners and size % n == 0:
        return _upsample_axis_integer(x, axis, size // n)
    if not align_corners and n % size == 0:
        return _downsample_axis_integer(x, axis, n // size)
    if align_corners:
        src = jnp.arange(size, dtype=jnp.float32) * ((n - 1) / max(size - 1, 1))
    else:
        src = (jnp.arange(size, dtype=jnp.float32) + 0.5) * (n / size) - 0.5
    src = jnp.clip(src, 0.0, n - 1)
    lo = jnp.floor(src).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, n - 1)
    w = (src - lo).astype(x.dtype)
    shape = [1] * x.ndim
    shape[axis] = size
    w = w.reshape(shape)
    return jnp.take(x, lo, axis=axis) * (1 - w) + jnp.take(x, hi, axis=axis) * w


def resize(image: jax.Array, shape: Sequence[int], align_corners: bool = False) -> jax.Array:
    """Linear resize of ``(B, *spatial, C)`` to ``(B, *shape, C)`` (separable, no anti-aliasing).

    Half-pixel centres: downsampling by 2 averages voxel pairs, exactly as trilinear
    ``F.interpolate(scale_factor=0.5, align_corners=False)`` in PyTorch. ``align_corners=True`` maps the
    corner voxels onto each other instead (PyTorch's ``align_corners=True``; only for interoperability with
    code that used it, since it breaks the "displacement times n" rule of :func:`upsample_field`).
    Upsampling every axis by a whole factor runs the native kernel where :func:`upsample_vjp` says ``"native"``.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != image.ndim - 2:
        raise ValueError(f"resize target {shape} does not match the spatial rank of {image.shape}")
    if not align_corners and _native_upsampling(image, shape):
        return _upsample_native(image, shape)
    return _resize_xla(image, shape, align_corners)


def _resize_xla(image: jax.Array, shape: Sequence[int], align_corners: bool = False) -> jax.Array:
    """:func:`resize` axis by axis in XLA (the reference of the native upsampling)."""
    for axis, size in enumerate(shape, start=1):
        image = _linear_axis(image, axis, size, align_corners)
    return image


def _native_upsampling(image: jax.Array, shape: Sequence[int]) -> bool:
    """Whether :func:`resize` to ``shape`` is an upsampling by whole factors the native kernel takes."""
    spatial = image.shape[1:-1]
    whole = all(n > 0 and t % n == 0 for n, t in zip(spatial, shape)) and tuple(spatial) != tuple(shape)
    return (
        whole
        and image.ndim in (4, 5)
        and image.dtype == jnp.float32
        and image.size > 0
        and upsample_vjp() == "native"
        and _native_available()
    )


def _as_5d(x: jax.Array) -> jax.Array:
    """``(B, *spatial, C)`` as the kernel's ``(B, D, H, W, C)`` (a 2-D array has ``D = 1``; a free reshape)."""
    return x if x.ndim == 5 else x.reshape(x.shape[0], 1, *x.shape[1:])


def _upsample_kernel(x: jax.Array, shape: Sequence[int]) -> jax.Array:
    """``csrc/upsample_linear_cpu.cc``'s forward: ``(B, *spatial, C)`` to ``(B, *shape, C)``."""
    lead = (1,) * (5 - x.ndim)  # a 2-D array goes in with D = 1
    out = jax.ShapeDtypeStruct((x.shape[0], *lead, *shape, x.shape[-1]), jnp.float32)
    y = jax.ffi.ffi_call("crd_upsample_linear", out, vmap_method="sequential")(_as_5d(x))
    return y.reshape(x.shape[0], *shape, x.shape[-1])


def _upsample_kernel_transpose(g: jax.Array, small: Sequence[int]) -> jax.Array:
    """``csrc/upsample_linear_cpu.cc``'s transpose: the cotangent ``(B, *shape, C)`` to ``(B, *small, C)``."""
    lead = (1,) * (5 - g.ndim)
    out = jax.ShapeDtypeStruct((g.shape[0], *lead, *small, g.shape[-1]), jnp.float32)
    dx = jax.ffi.ffi_call("crd_upsample_linear_t", out, vmap_method="sequential")(_as_5d(g))
    return dx.reshape(g.shape[0], *small, g.shape[-1])


def _upsample_native(x: jax.Array, shape: Sequence[int]) -> jax.Array:
    """Linear upsampling of ``(B, *spatial, C)`` float32 to ``(B, *shape, C)``, every axis by a whole factor, by
    ``csrc/upsample_linear_cpu.cc`` (forward and transpose; XLA's stencil on another platform of the same trace)."""
    return _upsample_native_vjp(x, tuple(x.shape[1:-1]), tuple(shape))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _upsample_native_vjp(x, small, shape):
    return lax.platform_dependent(x, cpu=lambda x: _upsample_kernel(x, shape), default=lambda x: _resize_xla(x, shape))


def _upsample_native_fwd(x, small, shape):
    return _upsample_native_vjp(x, small, shape), None


def _upsample_native_bwd(small, shape, _, g):
    def elsewhere(g):  # the stencil's transpose (the forward is linear: any primal point will do)
        return jax.vjp(lambda x: _resize_xla(x, shape), jnp.zeros((g.shape[0], *small, g.shape[-1]), g.dtype))[1](g)[0]

    return (lax.platform_dependent(g, cpu=lambda g: _upsample_transpose_vjp(g, small, shape), default=elsewhere),)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _upsample_transpose_vjp(g, small, shape):
    """The native transpose, differentiable in turn: its own transpose is the forward, so gradients of gradients
    (reverse over reverse) stay native to any order."""
    return _upsample_kernel_transpose(g, small)


def _upsample_transpose_fwd(g, small, shape):
    return _upsample_transpose_vjp(g, small, shape), None


def _upsample_transpose_bwd(small, shape, _, h):
    return (_upsample_native_vjp(h, small, shape),)


_upsample_transpose_vjp.defvjp(_upsample_transpose_fwd, _upsample_transpose_bwd)

_upsample_native_vjp.defvjp(_upsample_native_fwd, _upsample_native_bwd)


def resize_field(disp: jax.Array, shape: Sequence[int]) -> jax.Array:
    """Resamples a displacement field to a new grid and rescales each component to the new voxel size."""
    ndim = disp.shape[-1]
    scale = jnp.asarray([t / s for t, s in zip(shape, disp.shape[1 : 1 + ndim])], disp.dtype)
    if all(t >= s for t, s in zip(shape, disp.shape[1 : 1 + ndim])):
        # scaling commutes with the (linear) resampling: on the coarse grid it costs 1 / factor^ndim of the work
        return resize(disp * scale, shape)
    return resize(disp, shape) * scale


def upsample_field(disp: jax.Array, factor: int) -> jax.Array:
    """``up(phi)`` of eq. 5: a field on a grid ``factor`` times coarser, resampled and multiplied by ``factor``.

    The result is remembered (by identity, weakly) as ``up(disp)``, so that L_reg of eq. 2 on it can be taken on
    ``disp``'s grid (:func:`upsampled_from`, :func:`crd_jax.ops.grad_l2.grad_l2`)."""
    out = resize_field(disp, [s * factor for s in disp.shape[1:-1]])
    # only what cannot change under it: a JAX array or tracer (a numpy source could be modified in place), a whole
    # factor and the shape it implies
    whole = isinstance(factor, (int, np.integer)) or (isinstance(factor, float) and factor.is_integer())
    if whole and int(factor) > 1 and isinstance(disp, jax.Array):
        if tuple(out.shape[1:-1]) == tuple(s * int(factor) for s in disp.shape[1:-1]):
            _remember_upsampled(out, disp, int(factor))
    return out


# id(up(phi)) -> (weak reference to up(phi), phi, factor); the entry goes when up(phi) does
_UPSAMPLED: dict = {}


def _remember_upsampled(out: jax.Array, source: jax.Array, factor: int) -> None:
    import weakref

    key = id(out)
    try:
        ref = weakref.ref(out, lambda _, key=key: _UPSAMPLED.pop(key, None))
    except TypeError:  # an array type without weak references: not remembered (the full-grid paths apply)
        return
    _UPSAMPLED[key] = (ref, source, factor)


def upsampled_from(disp: jax.Array) -> Optional[tuple]:
    """``(phi, factor)`` when ``disp`` is the very array (or tracer) :func:`upsample_field` returned for ``phi``,
    else None. An identity test: any array computed from it, even an equal one, is not recognised, so the
    answer is never wrong, only sometimes absent."""
    entry = _UPSAMPLED.get(id(disp))
    if entry is None or entry[0]() is not disp:
        return None
    source = entry[1]
    deleted = getattr(source, "is_deleted", None)  # a concrete array deleted or donated since
    if not isinstance(source, jax.core.Tracer) and deleted is not None and deleted():
        return None
    return source, entry[2]


def downsample_field(disp: jax.Array, factor: int) -> jax.Array:
    """Inverse of :func:`upsample_field` for sizes divisible by ``factor``: resample and divide by ``factor``."""
    shape = disp.shape[1:-1]
    if any(s % factor for s in shape):
        raise ValueError(f"field size {shape} is not divisible by {factor}")
    return resize_field(disp, [s // factor for s in shape])


def compose(u: jax.Array, v: jax.Array, mode: str = "border") -> jax.Array:
    """Displacement of "first ``v``, then ``u``": ``warp(warp(I, u), v) == warp(I, compose(u, v))``.

    ``compose(u, v)(x) = v(x) + u(x + v(x))``.
    """
    return v + warp(u, v, order=1, mode=mode)


def integrate_velocity(velocity: jax.Array, steps: int = 7, mode: str = "border") -> jax.Array:
    """Scaling and squaring of a stationary velocity field (VoxelMorph-diff, Dalca et al. 2018).

    ``u = v / 2^steps``, then ``steps`` times ``u <- u + u(x + u)`` (compose ``u`` with itself). A
    ``lax.fori_loop`` keeps the compiled graph one step long.
    """
    if steps < 0:
        raise ValueError("steps must be >= 0")
    u = velocity / (2.0**steps)
    return lax.fori_loop(0, steps, lambda _, u: compose(u, u, mode=mode), u)
