"""Table X: alpha = 1, beta = 0.1 in eq. 10."""

from configs.ablations._common import distillation_weights


def get_config():
    return distillation_weights("alpha = 1, beta = 0.1", "alpha1_beta0p1", alpha=1, beta=0.1)
