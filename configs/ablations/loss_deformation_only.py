"""Table IX: deformation distillation only (beta = 0)."""

from configs.oasis_vm import get_config as crd


def get_config():
    c = crd()
    c.name = "Ablation: deformation distillation only (VM on OASIS)"
    c.workdir = "runs/ablation_loss_deformation_only"
    c.loss.beta = 0.0
    return c
