"""Table IX: feature distillation only (alpha = 0)."""

from configs.oasis_vm import get_config as crd


def get_config():
    c = crd()
    c.name = "Ablation: feature distillation only (VM on OASIS)"
    c.workdir = "runs/ablation_loss_feature_only"
    c.loss.alpha = 0.0
    return c
