"""Pyd-diff on Mindboggle-101: the -H, -L, FST and -L-CRD rows of Table II.

python train.py --config=configs/mindboggle_pyd_diff.py --config.data.root=/path/to/data"""

from configs._datasets import mindboggle
from crd_jax.config import use_pyramid


def get_config():
    c = mindboggle("Pyd-diff")
    use_pyramid(c, diffeomorphic=True)
    return c
