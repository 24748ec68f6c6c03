"""The unsupervised registration objective shared by every stage (eq. 3, 4, 5, 7)."""

from __future__ import annotations

from typing import Dict, Tuple

import jax

from crd_jax import losses
from crd_jax.ops.spatial import warp


def registration_loss(
    moving: jax.Array, fixed: jax.Array, disp: jax.Array, reg_weight: float = 1.0, window: int = 9
) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """``L = L_sim(I_m(phi), I_f) + lambda L_reg(phi)`` (eq. 3), on the grid of ``fixed``.

    For a low-resolution model ``disp`` is already ``up(phi^L)``, which makes this eq. 5; for the teacher
    it is ``up(phi^T)``, eq. 7. Returns the loss and its two terms.
    """
    sim = losses.ncc(fixed, warp(moving, disp), window=window)
    reg = losses.grad_l2(disp)
    return sim + reg_weight * reg, {"sim": sim, "reg": reg}
