"""Is VM-LL-CRD better than the step-matched VM-LL control beyond training noise? Replicates of the last two
stages of ``configs/lpba40_vm_3d_ll.py`` (issue 11).

python benchmarks/reproduce.py --setting 3d-ll-rep --reuse ~/crd-runs/reproduce_lpba40_3d-ll

VM-H, VM-LL, S1 and the FST are the finished ones of the main run (``--reuse`` copies their model folders;
without it they are trained again, ~2 h). Then, each from VM-LL for 3,000 steps:

* ``seed = 1, 2``: VM-LL-CRD and the VM-LL control on new streams of training pairs (the main run's pair
  stream is seed 0), so that the CRD - control difference can be compared with its spread over streams;
* ``augment = "bspline"``: the same two under the authors' random B-spline augmentation of the moving image
  (a control point every 8 voxels, displacements N(0, 2^2) voxels; chosen a priori, not tuned), which the
  main run does not use.

CRD and its control always share a pair stream (and augmentation draws), so each difference is paired.
"""

from configs.lpba40_vm_3d_ll import BASE_STEPS
from configs.lpba40_vm_3d_ll import get_config as main_run_config
from crd_jax.config import stage

SEEDS = (1, 2)


def get_config():
    c = main_run_config()
    c.name = "VM-LL-CRD vs the VM-LL control: replicates on LPBA40 at 64x80x64 (3-D, n = 4)"
    c.workdir = "runs/lpba40_vm_3d_ll_replicates"
    for name in ("vm_h", "vm_ll", "fst"):
        c.stages[name].evaluate = False  # evaluated in the main run
    pipeline = ["vm_h", "vm_ll", "coop", "fst"]
    variants = [(f"s{s}", dict(seed=s), f"seed {s}") for s in SEEDS[:1]]
    variants += [("aug", dict(augment="bspline"), "B-spline aug.")]
    variants += [(f"s{s}", dict(seed=s), f"seed {s}") for s in SEEDS[1:]]
    for suffix, extra, note in variants:
        crd, control = f"vm_ll_crd_{suffix}", f"vm_ll_long_{suffix}"
        c.stages[crd] = stage("distill", teacher="fst", steps=BASE_STEPS, init="vm_ll", label=f"VM-LL-CRD ({note})", **extra)
        c.stages[control] = stage(
            "baseline", resolution="low", steps=BASE_STEPS, init="vm_ll", label=f"VM-LL +{BASE_STEPS} ({note})", **extra
        )
        pipeline += [crd, control]
    c.pipeline = tuple(pipeline)
    return c
