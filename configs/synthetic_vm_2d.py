"""The CRD scheme on synthetic 2-D brains (64x64): the quickest way to see every stage run.

python train.py --config=configs/synthetic_vm_2d.py
"""

from crd_jax.config import base_config, set_steps


def get_config():
    c = base_config()
    c.name = "VM on synthetic 2-D brains (64^2)"
    c.workdir = "runs/synthetic_vm_2d"
    c.data.kind = "synthetic"
    c.data.ndim = 2
    c.data.synthetic.shape = (64, 64)
    c.data.synthetic.max_displacement = 4.0
    c.data.synthetic.train, c.data.synthetic.val, c.data.synthetic.test = 40, 4, 8
    c.train.batch_size = 4
    c.train.lr = 1e-3  # far fewer steps than the paper's 5e5, so a larger step size
    c.train.log_every = 20
    c.train.eval_every = 200
    c.train.checkpoint_every = 100
    set_steps(c, 400)
    return c
