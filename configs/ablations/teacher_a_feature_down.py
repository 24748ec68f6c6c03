"""Table VI, teacher A (feature down): VM-H features downsampled to the student's sizes, so both deformation
and feature distillation apply (the paper shows this corrupts the teacher's knowledge)."""

from configs.ablations._common import ablation, baselines, student


def get_config():
    return ablation(
        "teacher A feature-down",
        ["vm_h", "vm_l", "vm_l_by_a_down"],
        **baselines(),
        vm_l_by_a_down=student("vm_h", "VM-L by A (feature down)", teacher_features="downsample"),
    )
