"""The datasets of the paper's Section IV-A as config fragments (imported by the per-backbone configs)."""

from crd_jax.config import base_config


def oasis(name: str):
    """Neurite-OASIS, 160x192x224, 35 labels; the paper's split 380 / 14 / 20 (all 20x19 test pairs)."""
    c = base_config()
    c.name = f"{name} on OASIS"
    c.workdir = f"runs/oasis_{name.lower().replace('-', '_')}"
    c.data.kind = "neurite_oasis"  # or learn2reg_oasis
    c.data.root = ""  # required: --config.data.root=/path/to/neurite-oasis
    c.data.splits.train, c.data.splits.val, c.data.splits.test = "0:380", "380:394", "394:414"
    c.data.labels = "oasis35"
    c.data.normalize = "none"  # aligned_norm is in [0, 1]; the authors feed it unchanged
    c.eval.hd95 = True
    return c


def mindboggle(name: str):
    """Mindboggle-101 as a folder (images/, labels/ named by subject, sorted: MMRR-21-*, NKI-RS-22-*,
    NKI-TRT-20-*). The paper trains on NKI-RS-22 + NKI-TRT-20 (42 subjects), validates on 8 MMRR-21 subjects
    and tests on 12, with volumes cropped to 192^3 and Dice over the labelled sub-areas."""
    c = base_config()
    c.name = f"{name} on Mindboggle-101"
    c.workdir = f"runs/mindboggle_{name.lower().replace('-', '_')}"
    c.data.kind = "folder"
    c.data.root = ""  # required
    c.data.splits.train, c.data.splits.val, c.data.splits.test = "21:63", "0:8", "8:20"
    c.data.labels = "auto"  # every label present in the evaluated subjects
    c.data.normalize = "minmax"
    c.data.shape = (192, 192, 192)
    c.eval.hd95 = True
    return c


def lpba40(name: str):
    """The 30 LPBA40 subjects in ../shared/data/lpba40 (160x192x160, 56 labels, affinely aligned):
    S11-S34 train, S35-S40 validate (all 30 ordered pairs). The paper trains on ADNI/ABIDE/ADHD and puts an
    affine network in front (model.affine = "joint"); these subjects are already affinely aligned."""
    c = base_config()
    c.name = f"{name} on LPBA40"
    c.workdir = f"runs/lpba40_{name.lower().replace('-', '_')}"
    c.data.kind = "folder"
    c.data.root = "../shared/data/lpba40"
    c.data.splits.train, c.data.splits.val, c.data.splits.test = "0:24", "24:30", ""
    c.data.labels = "lpba40"
    c.data.normalize = "none"
    c.eval.split = "val"
    c.eval.hd95 = True
    return c
