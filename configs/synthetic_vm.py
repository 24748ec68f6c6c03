"""The built-in default: the whole CRD scheme on the synthetic 3-D dataset, in minutes on 2 CPU cores.

python train.py --config=configs/synthetic_vm.py
"""

from crd_jax.config import base_config, set_steps


def get_config():
    c = base_config()
    c.name = "VM on synthetic 3-D brains (32^3)"
    c.workdir = "runs/synthetic_vm"
    c.data.kind = "synthetic"
    c.data.synthetic.shape = (32, 32, 32)
    c.data.synthetic.train, c.data.synthetic.val, c.data.synthetic.test = 30, 4, 5
    # A CPU budget of minutes instead of the paper's 5e5 steps per stage: more, smaller steps (batch 1)
    # train faster than fewer large ones here, and a larger learning rate (3e-3 diverges).
    c.train.batch_size = 1
    c.train.lr = 1e-3
    c.train.log_every = 20
    c.train.eval_every = 200
    c.train.checkpoint_every = 100
    set_steps(c, 400)
    return c
