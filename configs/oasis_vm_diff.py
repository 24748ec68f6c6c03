"""VM-diff on Neurite-OASIS: the paper's diffeomorphic rows (VM-diff-H, -L, -L-CRD) of Table II."""

from configs.oasis_vm import get_config as oasis_vm


def get_config():
    c = oasis_vm()
    c.name = "VM-diff on OASIS"
    c.workdir = "runs/oasis_vm_diff"
    c.model.diffeomorphic = True  # stationary velocity integrated by scaling and squaring, 7 steps
    c.model.int_steps = 7
    return c
