"""The field's smoothness term (L_reg of eq. 2) two ways: XLA's forward differences (:func:`grad_l2_reference`,
the reference, and the path everywhere but the CPU) and a native forward (``csrc/grad_l2_cpu.cc``) whose backward is XLA slices.

:func:`grad_l2_formulation` chooses: ``"native"`` (default where the native kernels are built) for float32 2-D
and 3-D fields: the forward reads the field once (XLA materialised the three difference arrays, a full field
each, and the backward read them again: at 128^3 on 2 cores the term took about as long as the fused NCC;
benchmarks/results/loss_speed.md); the backward is the differences' transpose as slices XLA fuses. ``"xla"`` keeps
:func:`grad_l2_reference` throughout; forward-mode autodiff (``jax.jvp``, ``jax.jacfwd``) and second derivatives
need it (the native path is a ``jax.custom_vjp``).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
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


def grad_l2(disp: jax.Array) -> jax.Array:
    """L_reg of eq. 2 (see :func:`crd_jax.losses.grad_l2`), natively where :func:`grad_l2_formulation` allows."""
    from crd_jax.ops import native

    native_ok = disp.ndim in (4, 5) and disp.size > 0 and disp.dtype == jnp.float32  # empty: the reference's NaN
    if native_ok and grad_l2_formulation() == "native" and native.available():
        return _grad_l2_native(disp)
    return grad_l2_reference(disp)


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
