"""Table VII, teacher D: RC only (the S1 model used at full resolution), deformation distillation."""

from configs.ablations._common import ablation, baselines, student
from crd_jax.config import stage


def get_config():
    c = ablation(
        "teacher D",
        ["vm_h", "vm_l", "coop", "vm_l_by_d"],
        **baselines(),
        coop=stage("cooperative", label="D (VM-H with RC)"),
        vm_l_by_d=student("coop", "VM-L by D"),
    )
    c.loss.beta = 0.0
    return c
