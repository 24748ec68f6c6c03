"""Baselines: one backbone at one input resolution (the paper's VM-H and VM-L rows).

factor 1: eq. 3 on the high-resolution pair. factor n = 2^k: the pair is downsampled, the field upsampled,
and the loss is taken against the high-resolution images, eq. 5.
"""

from __future__ import annotations

from crd_jax.models.registrar import Registrar
from crd_jax.losses import registration_loss


def make_loss(model: Registrar, reg_weight: float = 1.0, window: int = 9, sim=None):
    def loss_fn(params, frozen, batch):
        del frozen  # a baseline has no frozen model
        out = model.apply(params, batch["moving"], batch["fixed"])
        loss, terms = registration_loss(batch["moving"], batch["fixed"], out.disp, reg_weight, window, sim)
        return loss, terms

    return loss_fn
