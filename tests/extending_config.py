"""The fork's training config of docs/extending.md: every stage kind, and the example's own (``symmetric``),
on the example's backbone, with the example's distillation term and, for one stage, its similarity.

    PYTHONPATH=<folder holding extending_example.py> python train.py --config=tests/extending_config.py

A config file is code the user runs, so it may import the fork's module (which registers what it adds).
"""

import extending_example  # noqa: F401  (registers the backbone, the term, the similarity and the stage kind)

from crd_jax.config import base_config, stage


def get_config():
    c = base_config()
    c.workdir = "runs/two_level_unet"
    c.data.synthetic.shape = (16, 16, 16)
    c.data.synthetic.train, c.data.synthetic.val, c.data.synthetic.test = 4, 0, 2
    c.model.backbone = "two_level_unet"
    c.model.channels = (4, 8)
    c.loss.beta = 0.0
    c.loss.terms.deformation_l1 = {"weight": 0.5}  # the new distillation term: one config line
    c.train.batch_size = 1
    c.train.progress_bar = False
    c.train.log_every = 1
    c.eval.timing_repeats = 1
    c.pipeline = ("u_h", "u_l", "coop", "fst", "u_l_crd", "joint_t", "joint_all", "sym")
    c.stages = {
        "u_h": stage("baseline", resolution="high", steps=2),
        "u_l": stage("baseline", resolution="low", steps=2),
        "coop": stage("cooperative", steps=2, evaluate=False),
        "fst": stage("teacher", backbone="coop", steps=2),
        "u_l_crd": stage("distill", teacher="fst", init="u_l", steps=2),
        "joint_t": stage("joint_teacher", steps=2, evaluate=False),
        "joint_all": stage("joint_all", steps=2, evaluate=False),
        # the new stage kind, with the new similarity for this stage only
        "sym": stage("symmetric", steps=2, label="U2-H (sym)", loss={"similarity": "mae"}),
    }
    return c
