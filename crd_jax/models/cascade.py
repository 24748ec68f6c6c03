"""Cascades of the same backbone (the paper's teacher C, "2-cascade VM-L", after Yu et al. 2020).

Network ``i`` registers the moving image warped by everything before it; the total displacement is the
composition, ``warp(M, total) = warp(...warp(warp(M, phi_1), phi_2)..., phi_n)``. Features are the last
network's.
"""

from __future__ import annotations

from typing import Callable, Dict

import flax.linen as nn
import jax

from crd_jax.models.output import as_output
from crd_jax.ops.spatial import compose, warp


class Cascade(nn.Module):
    make_backbone: Callable[[str], nn.Module]
    count: int = 2

    @nn.compact
    def __call__(self, moving: jax.Array, fixed: jax.Array) -> Dict:
        total, out = None, None
        for i in range(self.count):
            current = moving if total is None else warp(moving, total)
            out = as_output(self.make_backbone(f"cascade_{i}")(current, fixed))
            total = out.disp if total is None else compose(total, out.disp)
        return out.replace(disp=total)
