"""VM on LPBA40 volumes resampled to 64x80x64 (the CPU-sized reproduction of Table IV, setting (b)).

python benchmarks/reproduce.py --setting 3d        # or: python train.py --config=configs/lpba40_vm_3d_small.py

Every volume is resampled once from 160x192x160 (1 mm) to 64x80x64 (2.5 x 2.4 x 2.5 mm; labels by nearest
neighbour) and centred on a 64x96x64 canvas (divisible by 2^(4 + k)): H = 64x96x64, L = 32x48x32. Evaluation
on all 30 ordered pairs of S35-S40, Dice over the 56 structures on the resampled grid.
"""

from configs.lpba40_vm import get_config as lpba40_vm
from crd_jax.config import set_steps


def get_config():
    c = lpba40_vm()
    c.name = "VM on LPBA40 resampled to 64x80x64 (3-D)"
    c.workdir = "runs/lpba40_vm_3d_small"
    c.data.resample_shape = (64, 80, 64)
    c.data.shape = (64, 96, 64)
    c.train.batch_size = 1
    c.train.lr = 1e-3
    c.train.log_every = 20
    c.train.eval_every = 250
    c.train.checkpoint_every = 100
    c.eval.val_pairs = 4
    set_steps(c, 600)
    return c
