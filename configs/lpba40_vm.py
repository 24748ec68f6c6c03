"""VM on LPBA40: the -H, -L, FST and -L-CRD rows of Table IV.

python train.py --config=configs/lpba40_vm.py"""

from configs._datasets import lpba40


def get_config():
    c = lpba40("VM")
    return c
