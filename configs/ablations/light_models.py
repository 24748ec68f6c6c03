"""Table III (VM): VM-light-H and VM-lighter-H (smaller networks at full resolution), each distilled from VM-H
by output (deformation) distillation as in Hinton et al. [36] and from a 2-cascade VM-H as in Yu et al. [43],
beside VM-L-CRD."""

from configs.ablations._common import ablation
from configs.oasis_vm import get_config as crd
from crd_jax.config import VM_LIGHT, VM_LIGHTER, stage


def get_config():
    c = crd()
    c.name = "Table III: light VoxelMorph models and their distillation (OASIS)"
    c.workdir = "runs/table3_vm_light"
    c.loss.beta = 0.0  # output distillation only: the light students' features have other channels
    light = {
        "vm_light_h": stage("baseline", resolution="high", model=VM_LIGHT, label="VM-light-H"),
        "vm_lighter_h": stage("baseline", resolution="high", model=VM_LIGHTER, label="VM-lighter-H"),
        "cascade_h": stage("baseline", resolution="high", model={"cascade": 2}, evaluate=False, label="2-cascade VM-H"),
        "vm_light_36": stage(
            "distill", teacher="vm_h", resolution="high", model=VM_LIGHT, init="vm_light_h", label="VM-light-H-[36]"
        ),
        "vm_light_43": stage(
            "distill", teacher="cascade_h", resolution="high", model=VM_LIGHT, init="vm_light_h", label="VM-light-H-[43]"
        ),
        "vm_lighter_36": stage(
            "distill", teacher="vm_h", resolution="high", model=VM_LIGHTER, init="vm_lighter_h", label="VM-lighter-H-[36]"
        ),
        "vm_lighter_43": stage(
            "distill", teacher="cascade_h", resolution="high", model=VM_LIGHTER, init="vm_lighter_h", label="VM-lighter-H-[43]"
        ),
    }
    for key, block in light.items():
        c.stages[key] = block
    c.pipeline = tuple(c.pipeline) + tuple(light)
    return c
