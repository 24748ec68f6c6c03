"""The field's smoothness term (L_reg of eq. 2) two ways: XLA's forward differences (:func:`grad_l2_reference`,
the reference, and the path everywhere but the CPU) and a native forward (``csrc/grad_l2_cpu.cc``) whose backward is XLA slices.

:func:`grad_l2_formulation` chooses: ``"native"`` (default where the native kernels are built) for float32 2-D
and 3-D fields: the forward reads the field once (XLA materialised the three difference arrays, a full field
each, and the backward read them again: at 128^3 on 2 cores the term took about as long as the fused NCC;
benchmarks/results/loss_speed.md); the backward is the differences' transpose as slices XLA fuses. ``"xla"`` keeps
:func:`grad_l2_reference` throughout; forward-mode autodiff (``jax.jvp``, ``jax.jacfwd``) and second derivatives
need it (the native path is a ``jax.custom_vjp``).

A field that :func:`crd_jax.ops.spatial.upsample_field` returned (``up(phi)`` of a low-resolution model, eq. 5) is
recognised (:func:`crd_jax.ops.spatial.upsampled_from`) and its term taken on the coarse grid, exactly
(:func:`grad_l2_of_upsampled`, ``crd_grad_l2_coarse``): at 128^3 the term of an upsampled field with its gradient
takes ~3 ms there against ~14 ms on the fine grid, measured alone; inside a training step XLA fuses the fine
term's gradient into the warp's, and the step gains a few percent of CPU time at most
(benchmarks/results/loss_speed_coarse_grad_l2.md). :func:`grad_l2_coarse` switches it off.

The same Gram matrices give the mean squared difference of two upsampled fields (eq. 8 on the full grid,
``loss.deformation_grid = "full"``: ``MSE(up(phi^T), up(phi^S))``) on the coarse grid: :func:`field_mse`
recognises the pair, :func:`mse_of_upsampled` computes it; :func:`mse_coarse` switches it off.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_settings: dict = {}


def grad_l2_reference(disp: jax.Array) -> jax.Array:
    """:func:`crd_jax.losses.grad_l2` with ``jnp.diff`` and JAX's autodiff."""
    ndim = disp.ndim - 2
    total = 0.0
    for axis in range(1, ndim + 1):
        d = jnp.diff(disp, axis=axis)
        total = total + jnp.mean(d * d)
    return total / ndim


def grad_l2_formulation(mode: Optional[str] = None) -> str:
    """How :func:`grad_l2` runs float32 2-D and 3-D fields: ``"native"`` (default where the native kernels are
    built; ``csrc/grad_l2_cpu.cc``) or ``"xla"`` (:func:`grad_l2_reference`; second derivatives need it). ``mode``
    sets it for this process (read when a function is traced); returns the mode in use."""
    if mode is not None:
        if mode not in ("native", "xla"):
            raise ValueError(f"grad-L2 formulation must be 'native' or 'xla', not {mode!r}")
        _settings["grad_l2"] = mode
    from crd_jax.ops import native

    return native.in_use(_settings.setdefault("grad_l2", "native"), "xla")


def grad_l2_coarse(enabled: Optional[bool] = None) -> bool:
    """Whether :func:`grad_l2` of a field that :func:`crd_jax.ops.spatial.upsample_field` returned is taken on the
    coarse field's grid (:func:`grad_l2_of_upsampled`; default on). ``enabled`` sets it for this process (read
    when a function is traced); returns the setting in use."""
    if enabled is not None:
        _settings["coarse"] = bool(enabled)
    return _settings.setdefault("coarse", True)


def mse_coarse(enabled: Optional[bool] = None) -> bool:
    """Whether :func:`field_mse` of two fields that :func:`crd_jax.ops.spatial.upsample_field` returned is taken
    on the coarse fields' grid (:func:`mse_of_upsampled`; default on). ``enabled`` sets it for this process (read
    when a function is traced); returns the setting in use."""
    if enabled is not None:
        _settings["mse_coarse"] = bool(enabled)
    return _settings.setdefault("mse_coarse", True)


def grad_l2(disp: jax.Array) -> jax.Array:
    """L_reg of eq. 2 (see :func:`crd_jax.losses.grad_l2`), natively where :func:`grad_l2_formulation` allows;
    on the coarse grid (:func:`grad_l2_of_upsampled`) where ``disp`` is ``up(phi)`` from ``upsample_field``."""
    from crd_jax.ops import native

    source = _coarse_source(disp) if grad_l2_coarse() else None
    if source is not None:
        return grad_l2_of_upsampled(*source)
    native_ok = disp.ndim in (4, 5) and disp.size > 0 and disp.dtype == jnp.float32  # empty: the reference's NaN
    if native_ok and grad_l2_formulation() == "native" and native.available():
        return _grad_l2_native(disp)
    return grad_l2_reference(disp)


def _coarse_source(disp: jax.Array) -> Optional[tuple]:
    """``(phi, factor)`` where ``disp`` is ``upsample_field(phi, factor)`` of a float32 2-D or 3-D field and the
    coarse forms can run (:func:`_coarse_forms_usable`), else None."""
    from crd_jax.ops.spatial import upsampled_from

    if not _coarse_forms_usable():
        return None
    source = upsampled_from(disp)
    if source is not None and source[0].dtype == jnp.float32 and source[0].ndim in (4, 5) and source[0].size > 0:
        return source
    return None


def _coarse_forms_usable() -> bool:
    """Whether the coarse forms can run: their custom VJPs need the native formulation (:func:`grad_l2_formulation`;
    forward-mode autodiff needs ``grad_l2_formulation("xla")``, which turns them off) and the built kernels."""
    from crd_jax.ops import native

    return grad_l2_formulation() == "native" and native.available()


def mse_on_coarse_grid() -> bool:
    """Whether :func:`field_mse` takes two upsampled fields on the coarse grid in this process: :func:`mse_coarse`
    on and the coarse forms usable (:func:`_coarse_forms_usable`)."""
    return mse_coarse() and _coarse_forms_usable()


def field_mse(u: jax.Array, v: jax.Array) -> jax.Array:
    """:func:`crd_jax.losses.mse` of two fields; on the coarse grid (:func:`mse_of_upsampled`) where both are
    ``upsample_field`` results by one factor from fields of one shape (``up(phi^T)`` and ``up(phi^S)`` in eq. 8 on
    the full grid)."""
    from crd_jax import losses

    if mse_on_coarse_grid() and u.shape == v.shape:
        a, b = _coarse_source(u), _coarse_source(v)
        if a is not None and b is not None and a[1] == b[1] and a[0].shape == b[0].shape:
            return mse_of_upsampled(a[0], b[0], a[1])
    return losses.mse(u, v)


def _as_3d(disp: jax.Array) -> jax.Array:
    """``(B, *spatial, C)`` as the kernel's ``(B, D, H, W, C)`` (a 2-D field has ``D = 1``; a free reshape)."""
    return disp if disp.ndim == 5 else disp.reshape(disp.shape[0], 1, *disp.shape[1:])


def _weights(disp: jax.Array) -> jax.Array:
    """d value / d (sum of squared differences along axis k) for the kernel's three axes: ``1 / (ndim * count_k)``
    for the field's own axes, 0 for the added axis of a 2-D field."""
    ndim = disp.ndim - 2
    spatial = disp.shape[1:-1]
    w = [1.0 / (ndim * (disp.size // n * (n - 1))) if n > 1 else float("nan") for n in spatial]
    return jnp.asarray(([0.0] if ndim == 2 else []) + w, jnp.float32)


def _native_value(disp):
    sums = jax.ffi.ffi_call("crd_grad_l2_fwd", jax.ShapeDtypeStruct((3,), jnp.float32), vmap_method="sequential")(_as_3d(disp))
    return jnp.sum(sums[3 - (disp.ndim - 2) :] * _weights(disp)[3 - (disp.ndim - 2) :])


@jax.custom_vjp
def _grad_l2_native(disp):
    return lax.platform_dependent(disp, cpu=_native_value, default=grad_l2_reference)


def _grad_l2_native_fwd(disp):
    return _grad_l2_native(disp), disp


def _grad_l2_native_bwd(disp, g):
    # The differences' transpose as XLA slices and pads: elementwise, so XLA fuses it into the sum of the field's
    # cotangents (the warp's, at least) and writes no field-sized array of its own (a native backward kernel's
    # fresh 24 MB output at 128^3 cost more in page faults, ~19 ms of system time a step, than it saved)
    ndim = disp.ndim - 2
    weights = _weights(disp)[3 - ndim :]
    out = jnp.zeros_like(disp)
    for k, axis in enumerate(range(1, ndim + 1)):
        if disp.shape[axis] < 2:
            continue
        d = jnp.diff(disp, axis=axis)
        pad_low, pad_high = [(0, 0)] * disp.ndim, [(0, 0)] * disp.ndim
        pad_low[axis], pad_high[axis] = (1, 0), (0, 1)
        out = out + (2.0 * g * weights[k]) * (jnp.pad(d, pad_low) - jnp.pad(d, pad_high))
    return (out.astype(disp.dtype),)


_grad_l2_native.defvjp(_grad_l2_native_fwd, _grad_l2_native_bwd)


# ---- L_reg of an upsampled field on the coarse grid -------------------------------------------------------------
#
# A low-resolution model's field reaches the loss as v = f U phi (upsample_field: U the half-pixel linear
# upsampling by f along every axis, phi on the coarse grid). L_reg(v) is a quadratic form in phi: along axis k the
# squared forward differences of v sum to f^2 sum_{b,c} phi_{b,c}^T (G_0 x ... x G_{ndim-1}) phi_{b,c} with the
# 1-D Gram matrices G_j = U_j^T U_j for j != k and G_k = (D_k U_k)^T (D_k U_k) (D_k: forward differences on the
# fine grid). U's rows touch two neighbouring coarse voxels, D U's at most three, so U^T U is tridiagonal and
# (D U)^T (D U) pentadiagonal: each factor is a few shifted multiply-adds on the coarse grid. With
# Z = sum_k w_k (G_0 x ... ) phi (w_k: eq. 2's mean over the fine grid's pairs along k, averaged over the axes),
# L_reg = <phi, Z> and its gradient is 2 Z: one pass over the coarse field forward, an elementwise product
# backward. At n = 2 the coarse field has 1/8 of the voxels, and the term never touches a full-resolution array
# (on the fine grid it read and wrote ~25 MB per step at 128^3). Equal to grad_l2(upsample_field(phi, f)) up to
# rounding (tests/test_loss_kernels.py).


def _upsample_matrix(n: int, k: int) -> np.ndarray:
    """``(n k, n)``: half-pixel linear upsampling by ``k`` with the edge repeated (crd_jax.ops.spatial.resize)."""
    m = np.zeros((n * k, n))
    for i in range(n):
        for r in range(k):
            o = (r + 0.5) / k - 0.5
            j = min(max(i + (1 if o > 0 else -1), 0), n - 1)
            m[k * i + r, i] += 1.0 - abs(o)
            m[k * i + r, j] += abs(o)
    return m


@functools.lru_cache(maxsize=64)
def _gram_bands(n: int, k: int):
    """The Gram matrices U^T U (``smooth``) and (D U)^T (D U) (``diff``) of one axis as ``{offset: diagonal}``
    (offsets -2..2, each diagonal as a length-n vector aligned with the output index), float64."""
    u = _upsample_matrix(n, k)
    du = np.diff(u, axis=0)  # (n k - 1, n): forward differences of the upsampled axis
    out = []
    for gram in (u.T @ u, du.T @ du):
        bands = {}
        for o in range(-(n - 1), n):
            d = np.diagonal(gram, o)
            if np.any(d != 0):
                if abs(o) > 2:
                    raise AssertionError("the Gram matrix is wider than the derivation says")
                row = np.zeros(n)  # y[i] += row[i] * x[i + o]
                if o >= 0:
                    row[: n - o] = d
                else:
                    row[-o:] = d
                bands[o] = row
        out.append(bands)
    return tuple(out)


def _apply_gram(x: jax.Array, bands: dict, axis: int, step: int = 1) -> jax.Array:
    """``y[i] = sum_o bands[o][i] x[i + o]`` along ``axis`` (a banded symmetric matrix times ``x``); ``step``: the
    axis interleaves that many channels (the last spatial axis with the channels folded into it)."""
    n = x.shape[axis]
    shape = [1] * x.ndim
    shape[axis] = n
    y = None
    for o, row in sorted(bands.items()):
        shift = abs(o) * step
        if shift >= n:
            continue
        pad = [(0, 0)] * x.ndim
        if o > 0:  # x[i + o]: drop the first entries, zeros at the end
            pad[axis] = (0, shift)
            shifted = jnp.pad(lax.slice_in_dim(x, shift, n, axis=axis), pad)
        elif o < 0:
            pad[axis] = (shift, 0)
            shifted = jnp.pad(lax.slice_in_dim(x, 0, n - shift, axis=axis), pad)
        else:
            shifted = x
        term = jnp.asarray(np.repeat(row, step).reshape(shape), x.dtype) * shifted
        y = term if y is None else y + term
    return jnp.zeros_like(x) if y is None else y


def _gram_weights(phi: jax.Array, factor: int):
    """``factor^2 / (ndim * pairs_k)``: the weight of axis k's sum of squares in L_reg (eq. 2's mean over the fine
    grid's ``pairs_k`` neighbouring pairs along k, averaged over the axes)."""
    ndim = phi.ndim - 2
    fine = [n * factor for n in phi.shape[1:-1]]
    pairs = [phi.shape[0] * phi.shape[-1] * int(np.prod(fine)) // fine[k] * (fine[k] - 1) for k in range(ndim)]
    return [float(factor) ** 2 / (ndim * p) for p in pairs]


def _gram_weight(phi: jax.Array, factor: int) -> float:
    """``factor^2 / N``: the weight of ``<d, (S_0 x ... ) d>`` in the mean over the fine grid's ``N`` values of
    ``(up(d))^2`` (``up = factor U``)."""
    fine = int(np.prod([n * factor for n in phi.shape[1:-1]]))
    return float(factor) ** 2 / (phi.shape[0] * phi.shape[-1] * fine)


def _packed_bands(phi: jax.Array, factor: int, kind: str = "grad_l2"):
    """The kernel's inputs: bands ``(3, 2, 5, N)`` (axes D, H, W; smooth, diff; offsets -2..2) and weights (3,); a
    2-D field as D = 1 with axis 0 the identity and weight 0. ``kind = "gram"``: the kernel's passes with axis 0's
    diff band replaced by its smooth one and weights ``(w, 0, 0)`` give ``Z = w (S_0 x S_1 x S_2) phi``."""
    ndim = phi.ndim - 2
    sizes = phi.shape[1:-1]
    n_pad = max(sizes)
    bands = np.zeros((3, 2, 5, n_pad), np.float32)
    weights = _gram_weights(phi, factor)
    if ndim == 2:
        bands[0, 0, 2, 0] = 1.0
        weights = [0.0] + weights
    for j, n in enumerate(sizes):
        for which, gram in enumerate(_gram_bands(n, factor)):
            for o, row in gram.items():
                bands[3 - ndim + j, which, o + 2, :n] = row
    if kind == "gram":
        bands[:, 1] = 0.0
        bands[0, 1] = bands[0, 0]
        weights = [_gram_weight(phi, factor), 0.0, 0.0]
    return bands, np.asarray(weights, np.float32)


def _native_z(phi: jax.Array, factor: int, kind: str = "grad_l2") -> jax.Array:
    bands, weights = _packed_bands(phi, factor, kind)
    field = phi if phi.ndim == 5 else phi.reshape(phi.shape[0], 1, *phi.shape[1:])
    z = jax.ffi.ffi_call("crd_grad_l2_coarse", jax.ShapeDtypeStruct(field.shape, jnp.float32), vmap_method="sequential")(
        field, jnp.asarray(bands), jnp.asarray(weights)
    )
    return z.reshape(phi.shape)


def _upsampled_z(phi: jax.Array, factor: int, kind: str = "grad_l2") -> jax.Array:
    """``Z`` natively on the CPU where the kernel is built (``csrc/grad_l2_cpu.cc``), else :func:`_upsampled_z_xla`."""
    from crd_jax.ops import native

    if native.available() and phi.dtype == jnp.float32:
        return lax.platform_dependent(
            phi, cpu=lambda p: _native_z(p, factor, kind), default=lambda p: _upsampled_z_xla(p, factor, kind)
        )
    return _upsampled_z_xla(phi, factor, kind)


def _upsampled_z_xla(phi: jax.Array, factor: int, kind: str = "grad_l2") -> jax.Array:
    """``Z = sum_k w_k (G_0 x ... x G_{ndim-1}) phi`` (the derivation above), on the channel-folded field; the
    products share their common factors (the last axis' smooth factor applied once for every k but the last).
    ``kind = "gram"``: ``Z = w (S_0 x ... x S_{ndim-1}) phi`` (:func:`mse_of_upsampled`). The reference of the
    kernel; slower than the fine-grid term on XLA's CPU backend, which fuses the passes into one loop and
    recomputes every tap."""
    ndim = phi.ndim - 2
    coarse, channels = phi.shape[1:-1], phi.shape[-1]
    x = phi.reshape(*phi.shape[:-2], coarse[-1] * channels)
    weights = _gram_weights(phi, factor)

    def along(y, j, which):
        smooth, diff = _gram_bands(coarse[j], factor)
        return _apply_gram(y, diff if which == "diff" else smooth, j + 1, channels if j == ndim - 1 else 1)

    if kind == "gram":
        for j in range(ndim):
            x = along(x, j, "smooth")
        return (x * _gram_weight(phi, factor)).reshape(phi.shape)

    # Horner-like: Z = sum_k w_k prod_j G_j^(k) phi, peeling one axis at a time from the last
    def products(y, axes, scale):
        """sum over k in axes of w_k prod_{j in axes} G_j^(k) y, with the factors of axes beyond applied."""
        if len(axes) == 1:
            return along(y, axes[0], "diff") * scale[axes[0]]
        last, rest = axes[-1], axes[:-1]
        smooth_last = along(y, last, "smooth")
        out = products(smooth_last, rest, scale)  # k in rest: the last axis smoothed
        diffed = along(y, last, "diff")
        for j in rest:  # k = last: every other axis smoothed
            diffed = along(diffed, j, "smooth")
        return out + diffed * scale[last]

    return products(x, list(range(ndim)), weights).reshape(phi.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _z_linear(x: jax.Array, factor: int, kind: str = "grad_l2") -> jax.Array:
    """``Z(x)``: linear and symmetric in ``x``, so its VJP is itself (gradients of any order in reverse mode)."""
    return _upsampled_z(x, factor, kind)


def _z_linear_fwd(x, factor, kind):
    return _upsampled_z(x, factor, kind), None


def _z_linear_bwd(factor, kind, _, g):
    return (_z_linear(g, factor, kind),)


_z_linear.defvjp(_z_linear_fwd, _z_linear_bwd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _quadratic(c: jax.Array, factor: int, kind: str = "grad_l2") -> jax.Array:
    return jnp.sum(c * _z_linear(c, factor, kind))


@_quadratic.defjvp
def _quadratic_jvp(factor, kind, primals, tangents):
    # d <c, Z c> = 2 <Z c, dc> (Z symmetric): one Z per step, its transpose 2 g Z
    (c,), (dc,) = primals, tangents
    z = _z_linear(c, factor, kind)
    return jnp.sum(c * z), 2.0 * jnp.sum(z * dc)


def grad_l2_of_upsampled(phi: jax.Array, factor: int) -> jax.Array:
    """``grad_l2(upsample_field(phi, factor))`` (L_reg of eq. 2 on ``up(phi)``, eq. 5) computed on ``phi``'s grid,
    without forming the upsampled field: ``<c, Z c>``, gradient ``2 Z c`` (the derivation above), ``c`` the field
    less its mean per volume and component. Z annihilates constants, so the mean changes nothing but rounding: a
    large constant part would otherwise cancel in float32 (the fine-grid term takes differences first)."""
    spatial = tuple(range(1, phi.ndim - 1))
    return _quadratic(phi - jnp.mean(phi, axis=spatial, keepdims=True), int(factor))


def mse_of_upsampled(a: jax.Array, b: jax.Array, factor: int) -> jax.Array:
    """``mse(upsample_field(a, factor), upsample_field(b, factor))`` (eq. 8 on the full grid for a teacher and a
    student that both predict on the coarse grid) computed on ``a``'s grid, without forming either upsampled
    field: with ``d = a - b`` and ``up = factor U``, the mean over the fine grid's ``N`` values of ``(up d)^2`` is
    ``factor^2 / N <d, (S_0 x ... x S_{ndim-1}) d>``, ``S_j = U_j^T U_j`` the tridiagonal Gram matrix of axis j's
    upsampling (positive definite: no cancellation to guard against); gradient ``2 factor^2 / N S d``."""
    if a.shape != b.shape:
        raise ValueError(f"mse_of_upsampled: shapes differ, {a.shape} vs {b.shape}")
    return _quadratic(a - b, int(factor), "gram")
