"""Stage S1, resolution cooperative training (Section III-B-1): one set of weights, two resolutions.

``L_cooperative = L^H + L^L`` (eq. 6), with L^H of eq. 4 on the high-resolution pair and L^L of eq. 5 on
the pair downsampled by ``n`` (field upsampled, loss against the high-resolution images).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from crd_jax.models.registrar import Registrar
from crd_jax.losses import Objective

if TYPE_CHECKING:
    from crd_jax.training.loop import LossFn


def make_loss(high: Registrar, low: Registrar, objective: Objective = Objective()) -> LossFn:
    if high.backbone is not low.backbone and high.backbone != low.backbone:
        raise ValueError("cooperative training shares one backbone between the two resolutions")

    def loss_fn(params, frozen, batch):
        del frozen
        m, f = batch["moving"], batch["fixed"]
        loss_h, terms_h = objective(batch, high.apply(params, m, f).disp)
        loss_l, terms_l = objective(batch, low.apply(params, m, f).disp)
        aux = {"loss_H": loss_h, "loss_L": loss_l, "sim_H": terms_h["sim"], "sim_L": terms_l["sim"]}
        return loss_h + loss_l, aux

    return loss_fn
