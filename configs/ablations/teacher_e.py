"""Table VII, teacher E: feature shift + fusion on a plain VM-H (no resolution cooperative training)."""

from configs.ablations._common import ablation, baselines, student
from crd_jax.config import stage


def get_config():
    return ablation(
        "teacher E",
        ["vm_h", "vm_l", "fst_e", "vm_l_by_e"],
        **baselines(),
        fst_e=stage("teacher", backbone="vm_h", label="E (FS + FF)"),
        vm_l_by_e=student("fst_e", "VM-L by E"),
    )
