"""Table VI, teacher A: a raw VM-H; the VM-L student gets deformation distillation only (features
differ in size, the resolution gap of Section I)."""

from configs.ablations._common import ablation, baselines, student


def get_config():
    c = ablation("teacher A", ["vm_h", "vm_l", "vm_l_by_a"], **baselines(), vm_l_by_a=student("vm_h", "VM-L by A"))
    c.loss.beta = 0.0
    return c
