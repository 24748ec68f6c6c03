"""LPBA40 with a separately trained affine network (its own stage), frozen in front of every later model."""

from configs.lpba40_vm import get_config as lpba40_vm
from crd_jax.config import stage


def get_config():
    c = lpba40_vm()
    c.name = "VM with a pre-trained affine network on LPBA40"
    c.workdir = "runs/lpba40_vm_affine_stage"
    c.stages.affine = stage("baseline", resolution="high", model={"backbone": "affine", "affine": "none"}, label="Affine")
    c.model.affine = "stage"
    c.model.affine_stage = "affine"
    c.pipeline = ("affine",) + tuple(c.pipeline)
    return c
