"""Table VIII, teacher F: S1, S2 and S3 trained jointly in one stage (the stage exports the student)."""

from configs.ablations._common import ablation, baselines
from crd_jax.config import stage


def get_config():
    return ablation("teacher F", ["vm_h", "vm_l", "joint_f"], **baselines(), joint_f=stage("joint_all", label="VM-L by F"))
