"""Stage S2, the feature-shifted teacher (Section III-B-2/3): fusion head trained, backbone frozen.

``frozen = {"backbone": S1 parameters}`` is a constant argument: no gradient reaches it and the optimizer
never sees it. Loss: eq. 7, ``L_sim(I^H_m(up(phi^T)), I^H_f) + lambda L_reg(up(phi^T))``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax

from crd_jax.models.teacher import Teacher
from crd_jax.losses import Objective

if TYPE_CHECKING:
    from crd_jax.training.loop import LossFn


def make_loss(teacher: Teacher, objective: Objective = Objective()) -> LossFn:
    def loss_fn(params, frozen, batch):
        m, f = batch["moving"], batch["fixed"]
        backbone = jax.lax.stop_gradient(frozen["backbone"])
        out = teacher.apply({"backbone": backbone, "head": params}, m, f)
        return objective(batch, out.disp)

    return loss_fn
