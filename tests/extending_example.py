"""The worked examples of docs/extending.md: a new backbone and a new distillation term (executed by
tests/test_extending.py)."""

from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from crd_jax import losses
from crd_jax.models import backbones
from crd_jax.models.layers import Conv, concat
from crd_jax.models.output import ModelOutput
from crd_jax.models.teacher import FusionHead
from crd_jax.models.voxelmorph import FlowHead
from crd_jax.training import distill


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


backbones.register_backbone(backbones.BackboneEntry(
    name="two_level_unet",
    fields={"channels": [8, 16]},  # stored in model.json, overridable as --config.model.channels
    build=_build,
    levels=lambda arch: 1,
    label="U2",
    fst_head=_fst_head,
))


# --- a distillation term: L1 distance between the teacher's and the student's fields ------------------------------


@distill.register_term
class DeformationL1(distill.DistillTerm):
    """``weight * mean |phi^T - phi^S|`` on the student's grid."""

    name = "deformation_l1"

    def value(self, t, s):
        return jnp.mean(jnp.abs(t["disp_low"] - s["disp_low"]))
