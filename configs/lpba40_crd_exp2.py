"""Experiment 2 of the science round: the paper's own LPBA40 regime. Every volume resampled to 128x128x128
after centre cropping (the paper, Section IV-A-3: here 160x192x160 at 1 mm -> 1.25 x 1.5 x 1.25 mm, no crop
needed), n = 2 (k = 1), VM backbone, the data split of Experiment 1 (train S11-S34, validate S35-S40).

    python benchmarks/crd_experiment.py --experiment 2 --data-root DIR     # CPU, resumable (slow)
    bash benchmarks/gpu_science.sh                                         # a lent GPU, time-boxed, resumable

PROTOCOL (written 2026-12-04 before any stage of it trained; the analysis is Experiment 1's)
  * ``vm_h`` VM-H and ``vm_l`` VM-L from scratch, 10,000 steps each; ``coop`` S1 from ``vm_h``, 10,000;
    ``fst_half`` and ``fst_full`` (``model.teacher_output``) on the frozen S1, 10,000 each.
  * FST choice: higher Dice on the 16 fixed training pairs; the gate, the three arms (control, CRD as in the
    paper, CRD as in the authors' code), the five streams (seeds 0-4), 10,000 steps each from ``vm_l``, and
    the statistics exactly as ``configs/lpba40_crd_exp1.py`` states them.
  * lr 1e-3 halved at 60% and 80% of each stage, batch 1 (the CPU budget's choice; the paper: 1e-4 for
    5e5 steps at batch 4).
"""

from configs._datasets import lpba40
from configs import lpba40_crd_exp1 as exp1
from configs.lpba40_crd_exp1 import ARMS, GATE, REFUTE, SEEDS  # noqa: F401 (the shared protocol)
from crd_jax.config import stage

STEPS = 10_000
TEACHER_PIPELINE = ("vm_h", "vm_l", "coop", "fst_half", "fst_full")
FSTS = {"half": "fst_half", "full": "fst_full"}
BASELINE_LOW = "vm_l"


def student_stages(fst: str, steps: int = STEPS):
    """Experiment 1's arms and streams, from VM-L at this regime's step budget."""
    return exp1.student_stages(fst, steps, BASELINE_LOW, "VM-L")


def get_config(fst: str = ""):
    c = lpba40("VM")
    c.name = "Experiment 2: CRD on LPBA40 at 128^3 (n = 2), the paper's regime"
    c.workdir = "runs/lpba40_crd_exp2"
    c.data.resample_shape = (128, 128, 128)
    c.data.shape = (128, 128, 128)
    c.model.shift = 1
    c.model.fusion = "compact"
    c.loss.deformation_grid = "full"
    c.train.batch_size = 1
    c.train.lr = 1e-3
    c.train.log_every = 25
    c.train.eval_every = 1000
    c.train.checkpoint_every = 250
    c.train.keep_checkpoints = 1
    # S3's frozen teacher once per training pair (training/teacher_cache.py): 552 pairs x 23.6 MiB at 128^3 (the
    # "half" FST; 47.6 MiB for the "full" one, whose field is at full resolution) do not fit in memory, so on
    # disk in <workdir>/teacher_cache/ (a speed setting: the training is the same)
    c.train.teacher_cache_disk_gb = 40.0
    c.eval.val_pairs = 4
    c.eval.hd95 = False
    c.stages.vm_h = stage("baseline", resolution="high", steps=STEPS)
    c.stages.vm_l = stage("baseline", resolution="low", steps=STEPS)
    c.stages.coop = stage("cooperative", steps=STEPS, init="vm_h", evaluate=False)
    c.stages.fst_half = stage("teacher", backbone="coop", steps=STEPS, label="FST (half)")
    c.stages.fst_full = stage("teacher", backbone="coop", steps=STEPS, model={"teacher_output": "full"}, label="FST (full)")
    c.pipeline = TEACHER_PIPELINE
    if fst:
        for name, block in student_stages(fst).items():
            c.stages[name] = block
        c.pipeline = TEACHER_PIPELINE + tuple(student_stages(fst))
    return c
