"""Shared by the ablation configs (Section V-D, on OASIS with VM, as in the paper)."""

from configs._datasets import oasis
from crd_jax.config import stage


def ablation(name: str, pipeline, **stages):
    """OASIS + VM with the given stages (blocks made with ``crd_jax.config.stage``)."""
    c = oasis("VM")
    c.name = f"Ablation {name} (VM on OASIS)"
    c.workdir = f"runs/ablation_{name.lower().replace(' ', '_').replace('-', '_')}"
    for key, block in stages.items():
        c.stages[key] = block
    c.pipeline = tuple(pipeline)
    return c


def baselines():
    """VM-H and VM-L, the reference rows of every ablation table."""
    return {"vm_h": stage("baseline", resolution="high"), "vm_l": stage("baseline", resolution="low")}


def student(teacher: str, label: str, **fields):
    """A VM-L student distilled from ``teacher``, started from VM-L like the CRD student."""
    return stage("distill", teacher=teacher, init="vm_l", label=label, **fields)


def distillation_weights(what: str, run: str, **weights):
    """The full CRD scheme (VM on OASIS) with other eq. 10 weights (``alpha``, ``beta``): Tables IX and X."""
    from configs.oasis_vm import get_config as crd

    c = crd()
    c.name = f"Ablation: {what} (VM on OASIS)"
    c.workdir = f"runs/ablation_{run}"
    for key, value in weights.items():
        c.loss[key] = value
    return c
