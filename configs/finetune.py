"""Fine-tune a finished model on your own scans (``crd_jax/training/finetune.py``).

    python train.py --config=configs/finetune.py --config.init_from=lpba40-vm-ll-crd \\
        --config.data.root=/path/to/scans --config.workdir=runs/my_finetune [--config.finetune.steps=2000]

``data.root`` holds ``images/`` (and optionally ``labels/``, same file names); every scan is mapped into the
model's own space (orientation, voxel size, normalisation) as ``crd-jax register`` maps inputs. With labels,
the last ``finetune.val_subjects`` subjects are held back and the model's validation Dice is reported before
and after. The result is ``<workdir>/stages/finetune/model``: ``crd-jax register --model`` takes it.
Unsupervised (NCC + smoothness, eq. 3/5) unless ``loss.label_weight > 0`` (then the training labels too).
"""

from crd_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "Fine-tuning"
    c.workdir = "runs/finetune"
    c.init_from = "lpba40-vm-ll-crd"
    c.data.kind = "folder"
    c.data.root = ""  # required: --config.data.root
    c.data.labels = "auto"
    c.finetune.steps = 1000
    c.finetune.val_subjects = 2
    c.train.batch_size = 1
    c.train.lr = 1e-4  # a tenth of the shipped models' training rate: adapt, do not retrain
    c.train.log_every = 25
    c.train.eval_every = 250
    c.train.checkpoint_every = 250
    c.eval.val_pairs = 2
    c.eval.hd95 = False
    c.eval.timing_repeats = 1
    c.eval.diagnostics = False
    return c
