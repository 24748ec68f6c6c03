"""The worked examples of docs/extending.md, as a fork would keep them: one module of its own (not inside
crd-jax) that registers a backbone, a distillation term, a similarity and a stage kind when imported.

tests/test_extending.py copies this file into a folder of its own, trains with it in one process
(``python train.py --config=tests/extending_config.py``, which imports it) and registers images with the
result in another (``crd-jax register``), once as a module on ``PYTHONPATH`` and once as an installed
package's entry point.
"""

import dataclasses
from typing import Tuple

import flax.linen as nn
import jax.numpy as jnp

from crd_jax import losses
from crd_jax.models import backbones
from crd_jax.models import build as mbuild
from crd_jax.models.layers import Conv, concat
from crd_jax.models.output import ModelOutput
from crd_jax.models.teacher import FusionHead
from crd_jax.models.voxelmorph import FlowHead
from crd_jax.training import distill, stage_kinds, stages


# --- a backbone: a two-level U-Net ----------------------------------------------------------------------------


class TwoLevelUNet(nn.Module):
    """``(moving, fixed) -> ModelOutput(disp, features={0: F_0, 1: F_1})``: one stride-2 level."""

    channels: Tuple[int, int] = (8, 16)
    negative_slope: float = 0.2

    @nn.compact
    def __call__(self, moving, fixed):
        x = concat([moving, fixed])
        e0 = Conv(self.channels[0], negative_slope=self.negative_slope, name="enc_0")(x)
        e1 = Conv(self.channels[1], stride=2, negative_slope=self.negative_slope, name="enc_1")(e0)
        f1 = Conv(self.channels[1], negative_slope=self.negative_slope, name="dec_1")(e1)
        # Conv(...)(f1, e0) is conv(concat([upsample_nearest(f1), e0])) as one op (never stored on the CPU kernel)
        f0 = Conv(self.channels[0], negative_slope=self.negative_slope, name="dec_0")(f1, e0)
        return ModelOutput(disp=FlowHead(name="flow")(f0), features={0: f0, 1: f1})


def _build(arch, name=None):
    return TwoLevelUNet(channels=tuple(arch["channels"]), negative_slope=float(arch["negative_slope"]), name=name)


def _fst_head(arch, factor):
    c0, c1 = arch["channels"]
    return FusionHead(decoder=((c1,), (c0,)), shift=int(factor).bit_length() - 1, negative_slope=float(arch["negative_slope"]))


BACKBONE = backbones.BackboneEntry(
    name="two_level_unet",
    fields={"channels": [8, 16]},  # stored in model.json, overridable as --config.model.channels
    build=_build,
    levels=lambda arch: 1,
    label="U2",
    fst_head=_fst_head,
)
backbones.register_backbone(BACKBONE)  # model.json records this module as the backbone's source


# --- a distillation term: L1 distance between the teacher's and the student's fields ------------------------------


@distill.register_term
class DeformationL1(distill.DistillTerm):
    """``weight * mean |phi^T - phi^S|`` on the student's grid."""

    name = "deformation_l1"

    def value(self, t, s):
        return jnp.mean(jnp.abs(t["disp_low"] - s["disp_low"]))


# --- a similarity: mean absolute intensity difference ------------------------------------------------------------


@losses.register_similarity
@dataclasses.dataclass(frozen=True)
class MeanAbsoluteDifference(losses.Similarity):
    """``mean |I_f - I_m(phi)|``: ``config.loss.similarity = "mae"`` (``window`` is not used)."""

    name = "mae"

    def __call__(self, fixed, warped):
        return jnp.mean(jnp.abs(fixed - warped))


# --- a stage kind: one model trained on both directions of every pair --------------------------------------------


@stage_kinds.register_kind("symmetric")
@dataclasses.dataclass(frozen=True)
class Symmetric(stage_kinds.StageConfig):
    """``L(m -> f) + L(f -> m)`` (eq. 3 in both directions) for one registrar at ``resolution``."""

    resolution: str = "high"

    def plan(self, c: stages.StageContext) -> stages.StagePlan:
        model = mbuild.registrar_from_config(c.arch, c.factor)
        objective = c.objective

        def loss_fn(params, frozen, batch):
            forward, parts = objective(batch, model.apply(params, batch["moving"], batch["fixed"]).disp)
            swapped = {**batch, "moving": batch["fixed"], "fixed": batch["moving"]}
            if "moving_labels" in batch:
                swapped.update(moving_labels=batch["fixed_labels"], fixed_labels=batch["moving_labels"])
            backward, _ = objective(swapped, model.apply(params, batch["fixed"], batch["moving"]).disp)
            return forward + backward, {"forward": forward, "backward": backward, "sim": parts["sim"]}

        init = model.init(c.key, c.moving, c.fixed)
        return stages.StagePlan(loss_fn, init, {}, model, lambda p: p, c.spec("registrar"))
