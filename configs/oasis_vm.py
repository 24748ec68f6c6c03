"""VM on Neurite-OASIS (Section IV-A-1): the paper's Table II rows VM-H, VM-L, VM-L-CRD (and the FST).

python train.py --config=configs/oasis_vm.py --config.data.root=/path/to/neurite-oasis

Data: the Neurite-OASIS release (Hoopes et al.; 414 subjects, 160x192x224, 35 labels), folders
OASIS_OAS1_XXXX_MR1/aligned_norm.nii.gz + aligned_seg35.nii.gz. The paper trains on 380 subjects and keeps
14 for validation and 20 for testing (all 20x19 ordered pairs). The other common split is the first 394
for training and 19 consecutive pairs of the last 20: splits.train="0:394", val="", eval_pairs="consecutive".
For the Learn2Reg 2021 copy set data.kind="learn2reg_oasis".
"""

from crd_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "VM on OASIS"
    c.workdir = "runs/oasis_vm"
    c.data.kind = "neurite_oasis"
    c.data.root = ""  # required: --config.data.root=...
    c.data.splits.train = "0:380"
    c.data.splits.val = "380:394"
    c.data.splits.test = "394:414"
    c.data.labels = "oasis35"
    c.data.normalize = "none"  # aligned_norm is already in [0, 1]; the authors feed it unchanged
    c.data.eval_pairs = "all"
    c.train.batch_size = 4  # Section IV-B-3: 4 on 4 GPUs
    c.eval.hd95 = True
    return c
