"""Table VI, teacher B: VM-large-H (channels doubled, ~4x the parameters of VM-H); deformation distillation."""

from configs.ablations._common import ablation, baselines, student
from crd_jax.config import VM_LARGE, stage


def get_config():
    c = ablation(
        "teacher B",
        ["vm_h", "vm_l", "vm_large_h", "vm_l_by_b"],
        **baselines(),
        vm_large_h=stage("baseline", resolution="high", model=VM_LARGE, label="VM-large-H"),
        vm_l_by_b=student("vm_large_h", "VM-L by B"),
    )
    c.loss.beta = 0.0
    return c
