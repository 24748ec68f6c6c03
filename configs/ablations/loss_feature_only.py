"""Table IX: feature distillation only (alpha = 0)."""

from configs.ablations._common import distillation_weights


def get_config():
    return distillation_weights("feature distillation only", "loss_feature_only", alpha=0.0)
