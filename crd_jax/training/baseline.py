"""Baselines: one backbone at one input resolution (the paper's VM-H and VM-L rows).

factor 1: eq. 3 on the high-resolution pair. factor n = 2^k: the pair is downsampled, the field upsampled,
and the loss is taken against the high-resolution images, eq. 5.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from crd_jax.models.registrar import Registrar
from crd_jax.losses import Objective

if TYPE_CHECKING:
    from crd_jax.training.loop import LossFn


def make_loss(model: Registrar, objective: Objective = Objective()) -> LossFn:
    def loss_fn(params, frozen, batch):
        del frozen  # a baseline has no frozen model
        return objective(batch, model.apply(params, batch["moving"], batch["fixed"]).disp)

    return loss_fn
