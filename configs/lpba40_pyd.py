"""Pyd on LPBA40: the -H, -L, FST and -L-CRD rows of Table IV.

python train.py --config=configs/lpba40_pyd.py"""

from configs._datasets import lpba40
from crd_jax.config import use_pyramid


def get_config():
    c = lpba40("Pyd")
    use_pyramid(c)
    return c
