"""Table III (Pyd): Pyd-light-H and Pyd-lighter-H (channels halved once and twice), distilled from Pyd-H by
output distillation [36] (eq. 11 over the intermediate fields), beside Pyd-L-CRD."""

from configs.oasis_pyd import get_config as crd
from crd_jax.config import PYD_LIGHT, PYD_LIGHTER, stage


def get_config():
    c = crd()
    c.name = "Table III: light pyramid models and their distillation (OASIS)"
    c.workdir = "runs/table3_pyd_light"
    c.loss.beta = 0.0
    light = {
        "pyd_light_h": stage("baseline", resolution="high", model=PYD_LIGHT, label="Pyd-light-H"),
        "pyd_lighter_h": stage("baseline", resolution="high", model=PYD_LIGHTER, label="Pyd-lighter-H"),
        "pyd_light_36": stage(
            "distill", teacher="vm_h", resolution="high", model=PYD_LIGHT, init="pyd_light_h", label="Pyd-light-H-[36]"
        ),
        "pyd_lighter_36": stage(
            "distill", teacher="vm_h", resolution="high", model=PYD_LIGHTER, init="pyd_lighter_h", label="Pyd-lighter-H-[36]"
        ),
    }
    for key, block in light.items():
        c.stages[key] = block
    c.pipeline = tuple(c.pipeline) + tuple(light)
    return c
