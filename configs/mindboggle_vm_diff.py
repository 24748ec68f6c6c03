"""VM-diff on Mindboggle-101: the -H, -L, FST and -L-CRD rows of Table II.

python train.py --config=configs/mindboggle_vm_diff.py --config.data.root=/path/to/data"""

from configs._datasets import mindboggle


def get_config():
    c = mindboggle("VM-diff")
    c.model.diffeomorphic = True  # VM-diff: stationary velocity, scaling and squaring (7 steps)
    return c
