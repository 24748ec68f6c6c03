"""Table X: alpha = 1, beta = 0.1 in eq. 10."""

from configs.oasis_vm import get_config as crd


def get_config():
    c = crd()
    c.name = "Ablation: alpha = 1, beta = 0.1 (VM on OASIS)"
    c.workdir = "runs/ablation_alpha1_beta0p1"
    c.loss.alpha, c.loss.beta = 1, 0.1
    return c
