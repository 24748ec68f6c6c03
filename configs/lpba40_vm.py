"""VM on LPBA40 (Section IV-A-3, Table IV) with the 30 subjects in ../shared/data/lpba40.

python train.py --config=configs/lpba40_vm.py

Layout: images/SNN.nii.gz and labels/SNN.nii.gz (160x192x160, 1 mm, intensities in [0, 1], 56 labels,
affinely pre-aligned). S11-S34 train, S35-S40 validate (all 30 ordered pairs). The paper trains on other
datasets (ADNI, ABIDE, ADHD) and tests on LPBA40 resampled to 128^3 with an affine network in front;
these subjects are already affinely aligned, so the deformable model runs alone.
"""

from crd_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "VM on LPBA40"
    c.workdir = "runs/lpba40_vm"
    c.data.kind = "folder"
    c.data.root = "../shared/data/lpba40"
    c.data.splits.train = "0:24"  # S11-S34
    c.data.splits.val = "24:30"  # S35-S40
    c.data.splits.test = ""
    c.data.labels = "lpba40"
    c.data.normalize = "none"
    c.data.eval_pairs = "all"
    c.eval.split = "val"
    c.eval.hd95 = True
    return c
