"""Pyd-diff on LPBA40: the -H, -L, FST and -L-CRD rows of Table IV.

python train.py --config=configs/lpba40_pyd_diff.py"""

from configs._datasets import lpba40
from crd_jax.config import use_pyramid


def get_config():
    c = lpba40("Pyd-diff")
    use_pyramid(c, diffeomorphic=True)
    return c
