"""VM on Mindboggle-101: the -H, -L, FST and -L-CRD rows of Table II.

python train.py --config=configs/mindboggle_vm.py --config.data.root=/path/to/data"""

from configs._datasets import mindboggle


def get_config():
    c = mindboggle("VM")
    return c
