"""Experiment 1 of the science round 3, pre-registered: does CRD beat a step-matched control when the teacher
has headroom? LPBA40 at 64x80x64 (2.5 mm), n = 4 (k = 2), the data split of ``configs/lpba40_vm_3d_ll.py``
(train S11-S34, validate S35-S40, all 30 ordered validation pairs).

    bash benchmarks/start_reproduction.sh 3d-ll-exp1      # resumable, many hours on 2 cores
    python benchmarks/crd_experiment.py --status         # where it is; --report writes the results files

PROTOCOL (written 2026-12-04 while only ``vm_h_15k`` had started, before any FST or student trained; not to be
changed after results)

Teacher phase (stages of this config, in order):
  * ``vm_h``, ``vm_ll``: the main run's VM-H and VM-LL (3,000 steps each), as shipped (lpba40-vm-h, lpba40-vm-ll).
  * ``vm_h_15k``: VM-H continued from ``vm_h`` for 12,000 more steps (15,000 in all); lr 1e-3 halved at 60%
    and 80% of the stage, batch 1, seed 0, as every stage here.
  * ``coop_15k``: S1 (resolution cooperative, eq. 4-6) from ``vm_h_15k``, 3,000 steps.
  * ``fst_half``: S2 on the frozen S1 backbone, the paper's text (phi^T at half the input resolution, upsampled
    by 2), 3,000 steps. ``fst_full``: the same with ``model.teacher_output = "full"`` (the authors' code: the
    fusion chain continues to full resolution through F^H_0), 3,000 steps.

Choice of the FST (no validation data used): the FST with the higher mean Dice on the 16 fixed training pairs
of the headroom diagnostic (``crd_jax.training.diagnostics.TRAIN_PAIRS``); ties go to "half" (the paper).

Gate (on the 30 validation pairs, Dice over the 56 LPBA40 labels at the 64x80x64 grid):
  FST - VM-LL >= +0.010  AND  ceiling - VM-LL >= +0.010, where ceiling is the chosen FST's field averaged onto
  the 16x32x16 student grid and upsampled back (the best any student on that grid could match).
  If the gate fails: the report says this regime has no recoverable headroom and no student trains.

Student phase (only if the gate passes), each from the shipped VM-LL (``vm_ll``), 6,000 steps, pair streams
seed 0-4 (stage ``seed``), each stream shared by the three arms (same pairs, same order):
  * control ``ctl_s<i>``: VM-LL trained on (L^L only, eq. 5);
  * ``crd_paper_s<i>``: S3 as in the paper (eq. 8-10: L^L + alpha L_def + beta L_feat on raw features, alpha 1,
    beta 0.1; eq. 8 on the full grid as the main run);
  * ``crd_code_s<i>``: S3 as in the authors' code (MSE on the field + MSE on attention maps, no L^L,
    alpha = beta = 1).

Statistics: per stream i, d_i = mean over the 30 validation pairs of Dice(CRD arm) - Dice(control). Over the
five streams: the mean, a t-interval (df 4, 95%), and a two-level bootstrap (10,000 draws: streams with
replacement, then the 6 validation subjects with replacement and the ordered pairs among the drawn subjects
re-formed; 95% percentile interval). Holm's correction across the two CRD arms (family of two one-sample
t-tests, alpha 0.05). Support for CRD: the Holm-adjusted interval excludes 0 on the positive side.
Refutation in this regime: the gate passed and the upper bound of the t-interval is below +0.003 for both arms.
"""

from configs.lpba40_vm_3d_ll import BASE_STEPS
from configs.lpba40_vm_3d_ll import get_config as main_run_config
from crd_jax.config import stage

TEACHER_STEPS = 4 * BASE_STEPS  # 12,000 on top of the main run's 3,000: 15,000 in all
STUDENT_STEPS = 2 * BASE_STEPS  # 6,000
SEEDS = (0, 1, 2, 3, 4)
FSTS = {"half": "fst_half", "full": "fst_full"}
BASELINE_LOW = "vm_ll"  # the student's own baseline: the gate's reference and every arm's starting point
TEACHER_PIPELINE = ("vm_h", "vm_ll", "vm_h_15k", "coop_15k", "fst_half", "fst_full")
#: S3 as in the authors' code (train.py): field MSE + attention-map MSE, no L^L, alpha = beta = 1
CODE_LOSS = {"feature_target": "attention", "student_term": False, "alpha": 1.0, "beta": 1.0}
ARMS = ("ctl", "crd_paper", "crd_code")
GATE = 0.010  # FST - VM-LL and ceiling - VM-LL, validation Dice
REFUTE = 0.003  # upper bound of the t-interval below this (both arms): refuted in this regime


def student_stages(fst: str, steps: int = STUDENT_STEPS, init: str = BASELINE_LOW, name: str = "VM-LL"):
    """The student phase's stage blocks (name -> block), every arm on every stream, under teacher ``fst``, each
    arm starting from stage ``init``; ``name`` labels the rows (Experiment 2 reuses this with VM-L)."""
    blocks = {}
    for seed in SEEDS:
        blocks[f"ctl_s{seed}"] = stage(
            "baseline", resolution="low", steps=steps, init=init, seed=seed, label=f"{name} +{steps} (stream {seed})"
        )
        blocks[f"crd_paper_s{seed}"] = stage(
            "distill", teacher=fst, steps=steps, init=init, seed=seed, label=f"{name}-CRD, paper (stream {seed})"
        )
        blocks[f"crd_code_s{seed}"] = stage(
            "distill",
            teacher=fst,
            steps=steps,
            init=init,
            seed=seed,
            loss=CODE_LOSS,
            label=f"{name}-CRD, authors' code (stream {seed})",
        )
    return blocks


def get_config(fst: str = ""):
    """The teacher phase; with ``fst`` ("fst_half" or "fst_full", chosen by the protocol) the student phase
    appended (the driver, ``benchmarks/crd_experiment.py``, does this only after the gate passed)."""
    c = main_run_config()
    c.name = "Experiment 1: CRD with a longer-trained teacher on LPBA40 at 64x80x64 (n = 4)"
    c.workdir = "runs/lpba40_crd_exp1"
    c.stages.vm_h.evaluate = False  # evaluated in the main run
    c.stages.vm_ll.evaluate = True  # the gate's reference, on the 30 pairs
    c.stages.vm_h_15k = stage("baseline", resolution="high", steps=TEACHER_STEPS, init="vm_h", label="VM-H (15k)")
    c.stages.coop_15k = stage("cooperative", steps=BASE_STEPS, init="vm_h_15k", evaluate=False)
    c.stages.fst_half = stage("teacher", backbone="coop_15k", steps=BASE_STEPS, label="FST (half)")
    c.stages.fst_full = stage(
        "teacher", backbone="coop_15k", steps=BASE_STEPS, model={"teacher_output": "full"}, label="FST (full)"
    )
    c.pipeline = TEACHER_PIPELINE
    if fst:
        blocks = student_stages(fst)
        for name, block in blocks.items():
            c.stages[name] = block
        c.pipeline = TEACHER_PIPELINE + tuple(blocks)
    return c
