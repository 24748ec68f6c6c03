"""Joint training of stages the paper trains separately (Table VIII), for the ablation teachers F and G.

* Teacher G, ``{S1, S2}``: ``L^H + L^L`` (eq. 6) on the backbone plus eq. 7 on the teacher, with gradients of
  eq. 7 reaching the backbone too (nothing is frozen).
* Teacher F, ``{S1, S2, S3}``: the same plus the distillation loss of eq. 10 for the student. The student
  learns from the teacher's outputs as constants (a distillation target is not pulled toward the student);
  the teacher still learns from its own registration losses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import jax

from crd_jax.losses import Objective
from crd_jax.training.distill import distillation_loss

if TYPE_CHECKING:
    from crd_jax.models.registrar import Registrar
    from crd_jax.models.teacher import Teacher
    from crd_jax.training.distill import DistillTerm
    from crd_jax.training.loop import LossFn


def _teacher_terms(high, low, teacher, params, batch, objective: Objective):
    m, f = batch["moving"], batch["fixed"]
    loss_h, _ = objective(batch, high.apply(params["backbone"], m, f).disp)
    loss_l, _ = objective(batch, low.apply(params["backbone"], m, f).disp)
    t = teacher.apply({"backbone": params["backbone"], "head": params["head"]}, m, f)
    loss_t, _ = objective(batch, t.disp)
    return loss_h + loss_l + loss_t, {"loss_H": loss_h, "loss_L": loss_l, "loss_T": loss_t}, t


def make_teacher_loss(high: Registrar, low: Registrar, teacher: Teacher, objective: Objective = Objective()) -> LossFn:
    def loss_fn(params, frozen, batch):
        del frozen
        total, aux, _ = _teacher_terms(high, low, teacher, params, batch, objective)
        return total, aux

    return loss_fn


def make_all_loss(
    high: Registrar,
    low: Registrar,
    teacher: Teacher,
    student: Registrar,
    terms: Sequence[DistillTerm],
    objective: Objective = Objective(),
) -> LossFn:
    def loss_fn(params, frozen, batch):
        del frozen
        total, aux, t = _teacher_terms(high, low, teacher, params, batch, objective)
        s = student.apply(params["student"], batch["moving"], batch["fixed"])
        d_total, d_aux = distillation_loss(jax.lax.stop_gradient(t), s, batch, terms, objective)
        aux.update({f"student_{k}": v for k, v in d_aux.items()})
        return total + d_total, aux

    return loss_fn
