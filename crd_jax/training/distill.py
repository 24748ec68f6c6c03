"""Stage S3, cross-resolution distillation (Section III-C): the low-resolution student under the teacher.

``L_distillation = L^L + alpha * L_deformation + beta * L_feature`` (eq. 10) with
``L_deformation = MSE(phi^T, phi^S)`` (eq. 8, both on the student's grid; for pyramids the sum over the
intermediate fields, eq. 11) and
``L_feature = sum_l MSE(F^T_l, F^S_l)`` (eq. 9) over the teacher's levels (F_0..F_3 for k = 1).
The teacher's parameters are a frozen argument; its outputs are constants for the student.

``feature_target``: ``raw`` compares the features themselves (the paper, after FitNets); ``attention``
compares attention maps ``sum_c F^2`` (the authors' released code, after Zagoruyko and Komodakis).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from crd_jax import losses
from crd_jax.models.registrar import Registrar
from crd_jax.registration_loss import registration_loss


def attention_map(feature: jax.Array) -> jax.Array:
    """``sum_c F^2``, keeping a channel axis of one."""
    return jnp.sum(feature * feature, axis=-1, keepdims=True)


def feature_loss(teacher_features, student_features, target: str = "raw"):
    """Eq. 9 over the levels the teacher provides."""
    if target not in ("raw", "attention"):
        raise ValueError(f"feature_target must be 'raw' or 'attention', got {target!r}")
    total = 0.0
    for level, ft in teacher_features.items():
        fs = student_features[level]
        if target == "raw" and ft.shape != fs.shape:
            raise ValueError(f"level {level}: teacher features {ft.shape} and student features {fs.shape} differ; "
                             "distil attention maps (loss.feature_target='attention') or set loss.beta=0")
        if target == "attention":
            ft, fs = attention_map(ft), attention_map(fs)
        total = total + losses.mse(ft, fs)
    return total


DEFORMATION_GRIDS = ("student", "full")


def deformation_loss(teacher_out, student_out, grid: str = "student"):
    """Eq. 8, ``MSE(phi^T, phi^S)``; for pyramids eq. 11, the sum over the levels of the intermediate fields
    that teacher and student share.

    ``grid = "student"``: both fields on the student's grid, in its voxels. ``grid = "full"``: ``up(phi^T)``
    against ``up(phi^S)`` at the high resolution, in high-resolution voxels (the authors' code); a field
    ``n`` times larger in voxels makes this term ``n^2`` times heavier at the same ``alpha``.
    """
    if grid not in DEFORMATION_GRIDS:
        raise ValueError(f"deformation grid must be one of {DEFORMATION_GRIDS}, got {grid!r}")
    if "fields" in teacher_out and "fields" in student_out:
        return sum(losses.mse(teacher_out["fields"][l], student_out["fields"][l]) for l in teacher_out["fields"])
    if grid == "full":
        return losses.mse(teacher_out["disp"], student_out["disp"])
    return losses.mse(teacher_out["disp_low"], student_out["disp_low"])


def distillation_loss(t, s, m, f, alpha, beta, reg_weight, window, feature_target, deformation_grid="student"):
    """Eq. 10 for a student output ``s`` given (constant) teacher output ``t``."""
    loss_l, terms = registration_loss(m, f, s["disp"], reg_weight, window)
    deformation = deformation_loss(t, s, deformation_grid) if alpha else 0.0
    feature = feature_loss(t["features"], s["features"], feature_target) if beta else 0.0
    total = loss_l + alpha * deformation + beta * feature
    return total, {"loss_L": loss_l, "sim": terms["sim"], "deformation": deformation, "feature": feature}


def make_loss(
    student: Registrar,
    teacher,
    alpha: float = 1.0,
    beta: float = 0.1,
    reg_weight: float = 1.0,
    window: int = 9,
    feature_target: str = "raw",
    deformation_grid: str = "student",
):
    """``teacher``: an object with ``apply(frozen, moving, fixed)`` returning ``disp_low`` and ``features``
    on the student's grid (the FST, :class:`crd_jax.models.teacher.Teacher`)."""

    def loss_fn(params, frozen, batch):
        m, f = batch["moving"], batch["fixed"]
        t = jax.lax.stop_gradient(teacher.apply(frozen, m, f))
        return distillation_loss(t, student.apply(params, m, f), m, f, alpha, beta, reg_weight, window, feature_target,
                                 deformation_grid)

    return loss_fn
