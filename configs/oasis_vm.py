"""VM on OASIS: the -H, -L, FST and -L-CRD rows of Table II.

python train.py --config=configs/oasis_vm.py --config.data.root=/path/to/data"""

from configs._datasets import oasis


def get_config():
    c = oasis("VM")
    return c
