"""LPBA40 with the affine network embedded in front of VM and trained jointly with it (Section IV-B-2)."""

from configs.lpba40_vm import get_config as lpba40_vm


def get_config():
    c = lpba40_vm()
    c.name = "VM with a joint affine network on LPBA40"
    c.workdir = "runs/lpba40_vm_affine_joint"
    c.model.affine = "joint"
    return c
