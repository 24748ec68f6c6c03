"""Fine-tune a finished model on your own scans (``crd_jax/training/finetune.py``; ``crd-jax finetune`` is the
same run from the command line).

    python train.py --config=configs/finetune.py --config.init_from=lpba40-vm-ll-crd \\
        --config.data.root=/path/to/scans --config.workdir=runs/my_finetune [--config.finetune.steps=2000]

``data.root`` holds ``images/`` (and optionally ``labels/``, same file names); every scan is mapped into the
model's own space (orientation, voxel size, normalisation) as ``crd-jax register`` maps inputs. With labels,
the last ``finetune.val_subjects`` subjects are held back and the model's validation Dice is reported before
and after. The result is ``<workdir>/stages/finetune/model``: ``crd-jax register --model`` takes it.
Unsupervised (NCC + smoothness, eq. 3/5) unless ``loss.label_weight > 0`` (then the training labels too).
"""

from crd_jax.training.finetune import default_config


def get_config():
    return default_config()
