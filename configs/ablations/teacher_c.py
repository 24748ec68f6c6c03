"""Table VI, teacher C: a 2-cascade VM-L (Yu et al.); deformation distillation of its output field."""

from configs.ablations._common import ablation, baselines, student
from crd_jax.config import stage


def get_config():
    c = ablation(
        "teacher C",
        ["vm_h", "vm_l", "cascade_l", "vm_l_by_c"],
        **baselines(),
        cascade_l=stage("baseline", resolution="low", model={"cascade": 2}, label="2-cascade VM-L"),
        vm_l_by_c=student("cascade_l", "VM-L by C"),
    )
    c.loss.beta = 0.0
    return c
