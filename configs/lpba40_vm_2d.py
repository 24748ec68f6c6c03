"""VM on 2-D axial slices of LPBA40 (the CPU-sized reproduction of Table IV, setting (a)).

python benchmarks/reproduce.py --setting 2d        # or: python train.py --config=configs/lpba40_vm_2d.py

Axial slices 60-79 of every subject (the 20 slices with the most labelled structures, ~32 of the 56),
full in-plane size: H = 160x192, L = 80x96. Pairs join the same slice of two subjects; evaluation runs
over all 30 ordered pairs of S35-S40 at each of the 20 slices (600 2-D pairs).
"""

from configs.lpba40_vm import get_config as lpba40_vm
from crd_jax.config import set_steps


def get_config():
    c = lpba40_vm()
    c.name = "VM on LPBA40 axial slices 60-79 (2-D)"
    c.workdir = "runs/lpba40_vm_2d"
    c.data.ndim = 2
    c.data.slice_axis = 2
    c.data.slice_range = (60, 80)
    c.data.cache_size = 64
    c.train.batch_size = 4
    c.train.lr = 1e-3  # a budget of minutes, not 5e5 steps; the paper's decay points are kept
    c.train.log_every = 50
    c.train.eval_every = 500
    c.train.checkpoint_every = 250
    c.eval.val_pairs = 8
    set_steps(c, 2500)
    return c
