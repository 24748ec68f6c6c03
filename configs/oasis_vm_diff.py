"""VM-diff on OASIS: the -H, -L, FST and -L-CRD rows of Table II.

python train.py --config=configs/oasis_vm_diff.py --config.data.root=/path/to/data"""

from configs._datasets import oasis


def get_config():
    c = oasis("VM-diff")
    c.model.diffeomorphic = True  # VM-diff: stationary velocity, scaling and squaring (7 steps)
    return c
