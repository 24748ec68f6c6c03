"""VM-diff on LPBA40: the -H, -L, FST and -L-CRD rows of Table IV.

python train.py --config=configs/lpba40_vm_diff.py"""

from configs._datasets import lpba40


def get_config():
    c = lpba40("VM-diff")
    c.model.diffeomorphic = True  # VM-diff: stationary velocity, scaling and squaring (7 steps)
    return c
