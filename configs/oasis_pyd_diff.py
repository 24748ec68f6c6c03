"""Pyd-diff on OASIS: the -H, -L, FST and -L-CRD rows of Table II.

python train.py --config=configs/oasis_pyd_diff.py --config.data.root=/path/to/data"""

from configs._datasets import oasis
from crd_jax.config import use_pyramid


def get_config():
    c = oasis("Pyd-diff")
    use_pyramid(c, diffeomorphic=True)
    return c
