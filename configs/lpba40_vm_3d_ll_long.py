"""A longer budget for the CRD stages of ``configs/lpba40_vm_3d_ll.py``: a stronger teacher (S1 and the FST
trained 3x longer) and a student and its control trained 5x longer (issue 11).

python benchmarks/reproduce.py --setting 3d-ll-long --reuse ~/crd-runs/reproduce_lpba40_3d-ll
(or benchmarks/start_reproduction.sh 3d-ll-long: resumable, about 3 hours on 2 cores)

Why: at 3,000 steps per stage the FST was barely above VM-LL and VM-LL-CRD did not beat the step-matched
control on any of three streams of training pairs (``lpba40_replicates.py``). The paper trains far longer
and its teacher is far ahead of its student. VM-H and VM-LL are the main run's (copied by ``--reuse``).
"""

from configs.lpba40_vm_3d_ll import BASE_STEPS
from configs.lpba40_vm_3d_ll import get_config as main_run_config
from crd_jax.config import stage


def get_config():
    c = main_run_config()
    c.name = "VM on LPBA40 at 64x80x64 (3-D, n = 4): CRD stages at a longer budget"
    c.workdir = "runs/lpba40_vm_3d_ll_long"
    c.stages.vm_h.evaluate = False  # evaluated in the main run
    c.stages.vm_ll.evaluate = False
    c.stages.coop_3x = stage("cooperative", steps=3 * BASE_STEPS, init="vm_h", evaluate=False)
    c.stages.fst_3x = stage("teacher", backbone="coop_3x", steps=3 * BASE_STEPS, label="FST (3x)")
    c.stages.vm_ll_crd_5x = stage("distill", teacher="fst_3x", steps=5 * BASE_STEPS, init="vm_ll", label="VM-LL-CRD (5x)")
    c.stages.vm_ll_long_5x = stage("baseline", resolution="low", steps=5 * BASE_STEPS, init="vm_ll", label="VM-LL +15000")
    c.pipeline = ("vm_h", "vm_ll", "vm_ll_long_5x", "coop_3x", "fst_3x", "vm_ll_crd_5x")  # the control first: cheapest
    return c
