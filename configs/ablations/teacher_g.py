"""Table VIII, teacher G: S1 and S2 trained jointly, then distillation (S3) separately."""

from configs.ablations._common import ablation, baselines, student
from crd_jax.config import stage


def get_config():
    return ablation(
        "teacher G",
        ["vm_h", "vm_l", "fst_g", "vm_l_by_g"],
        **baselines(),
        fst_g=stage("joint_teacher", label="G ({S1, S2})"),
        vm_l_by_g=student("fst_g", "VM-L by G"),
    )
