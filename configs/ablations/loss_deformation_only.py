"""Table IX: deformation distillation only (beta = 0)."""

from configs.ablations._common import distillation_weights


def get_config():
    return distillation_weights("deformation distillation only", "loss_deformation_only", beta=0.0)
