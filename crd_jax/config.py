"""The default configuration: every field a user may change, with the paper's values.

Config files under ``configs/`` start from :func:`base_config` and change what their dataset and backbone
need. Section numbers refer to Hu et al., "Cross-Resolution Distillation for Efficient 3D Medical Image
Registration", IEEE TCSVT 2022.
"""

from __future__ import annotations

from typing import Any

import ml_collections

VM_ENCODER = (16, 32, 32, 32)
VM_DECODER = ((32,), (32,), (32,), (32, 32), (16, 16))


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "crd-jax"
    c.seed = 0  # every random key derives from it
    c.workdir = "runs/default"

    # --- model (Section III-A, IV-D) -----------------------------------------------------------------
    c.model = ml_collections.ConfigDict()
    c.model.backbone = "voxelmorph"
    c.model.encoder = VM_ENCODER  # VoxelMorph-2 channels, stride-2 convs
    c.model.encoder_strides = (2, 2, 2, 2)
    c.model.encoder_pooling = "stride"  # or "maxpool" (voxelmorph 0.2 VxmDense / MONAI layout)
    c.model.decoder = VM_DECODER  # per level, deepest first
    c.model.negative_slope = 0.2  # LeakyReLU
    c.model.diffeomorphic = False  # True: VM-diff (stationary velocity, scaling and squaring)
    c.model.int_steps = 7
    # Flow heads start from PyTorch's default draw, as in the authors' code; "small" is VoxelMorph's N(0, 1e-5),
    # which starves 3-D training (backbone gradients below Adam's eps; see models.layers.redraw_flow_heads).
    c.model.flow_init = "torch"
    c.model.shift = 1  # k: the student sees inputs downsampled by n = 2^k (Section III-B-1; k = 2 is "LL")
    # FST head: "paper" (Table I literally, 4 fusion convs per level: 1.86M parameters for VM), "compact" (one
    # fusion conv per level: the 0.6M teacher the paper states), "official" (the authors' released code, n = 2)
    c.model.fusion = "paper"
    c.model.teacher_align_corners = False  # the authors' teacher downsamples with align_corners=True
    # where the FST predicts phi^T: "half" (the paper's text: the student's grid, upsampled) or "full" (the
    # authors' voxelmorph_Hinput.py: the fusion chain continues through F^H_{k-1}..F^H_0 to full resolution)
    c.model.teacher_output = "half"
    c.model.estimator = (32, 16)  # pyramid backbones: convs before each level's flow head
    c.model.cascade = 1  # > 1: that many copies of the backbone in sequence (teacher C)
    c.model.affine = "none"  # "joint": an affine network in front, trained with it; "stage": pre-trained, frozen
    c.model.affine_stage = ""  # with affine = "stage": the stage that trained it
    c.model.affine_channels = (16, 32, 64, 128, 256)

    # --- losses (eq. 1-10) ---------------------------------------------------------------------------
    c.loss = ml_collections.ConfigDict()
    c.loss.reg_weight = 1.0  # lambda of eq. 3-7 (the paper follows VoxelMorph: 1)
    c.loss.similarity = "ncc"  # L_sim of eq. 1: "ncc" (the paper), "mind" (MIND-SSC) or "nmi" for multi-modal pairs
    c.loss.ncc_window = 9  # 9^3 window of eq. 1
    # weight of 1 - soft Dice of the warped training label maps (VoxelMorph's semi-supervised mode); 0: the
    # paper's unsupervised training. Needs label maps for the training subjects.
    c.loss.label_weight = 0.0
    c.loss.alpha = 1.0  # deformation distillation weight, eq. 10
    c.loss.beta = 0.1  # feature distillation weight, eq. 10
    c.loss.feature_target = "raw"  # raw features (the paper) or "attention" maps (the authors' code)
    # whether S3 trains on L^L too (eq. 10, the paper); False: distillation terms only (the authors' train.py)
    c.loss.student_term = True
    c.loss.terms = ml_collections.ConfigDict()  # more eq. 10 terms: {name: {"weight": w, ...}} (distill.TERMS)
    c.loss.deformation_grid = "student"  # eq. 8 on the student's grid, or "full": up(phi^T) vs up(phi^S) (authors' code)

    # --- data (Section IV-A) ------------------------------------------------------------------------
    c.data = ml_collections.ConfigDict()
    c.data.kind = "synthetic"  # synthetic | neurite_oasis | learn2reg_oasis | folder
    c.data.root = ""
    c.data.images_dir = "images"  # folder layout only
    c.data.labels_dir = "labels"
    c.data.ndim = 3
    c.data.splits = ml_collections.ConfigDict({"train": "", "val": "", "test": ""})  # "a:b" or ids
    c.data.labels = "auto"  # protocol name (oasis35, lpba40), a list of label values, "auto", or "none" (no Dice)
    c.data.normalize = "none"  # none | minmax | percentile
    c.data.percentiles = (0.5, 99.5)
    c.data.resample_shape = ()  # resample volumes to this shape first; () keeps the stored grid
    c.data.shape = ()  # network canvas; () = smallest multiple of 2^(levels + k) holding the volume
    c.data.slice_axis = -1  # >= 0: train and evaluate 2-D models on slices of 3-D volumes (ndim = 2)
    c.data.slice_range = (0, 0)  # [start, stop) slice indices along slice_axis
    c.data.eval_pairs = "all"  # all ordered pairs, or consecutive
    c.data.atlas = ""  # a subject id: atlas-based instead of subject-to-subject registration
    c.data.cache_size = 64
    c.data.prefetch = 2
    # random B-spline deformation of each moving training image (the authors' code; not in the paper):
    # a control point every `spacing` voxels of the network canvas, displacements N(0, sigma^2) voxels
    c.data.augment = ml_collections.ConfigDict({"kind": "none", "spacing": 8.0, "sigma": 2.0})
    c.data.synthetic = ml_collections.ConfigDict()
    c.data.synthetic.shape = (32, 32, 32)
    c.data.synthetic.num_labels = 16
    c.data.synthetic.max_displacement = 3.0
    c.data.synthetic.seed = 0
    c.data.synthetic.train = 30
    c.data.synthetic.val = 5
    c.data.synthetic.test = 5

    # --- optimisation (Section IV-B-2) --------------------------------------------------------------
    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 4  # global batch (the paper: 4 on 4 GPUs); split over every device
    c.train.lr = 1e-4
    c.train.b1 = 0.9
    c.train.b2 = 0.99
    c.train.lr_decay_at = (0.6, 0.8)  # 3e5 and 4e5 of 5e5 steps
    c.train.lr_decay_factor = 0.5
    c.train.grad_clip = 1.0  # global-norm clipping before Adam, as the authors' code (0: off)
    c.train.max_steps = -1  # > 0 caps every stage (quick trials)
    c.train.log_every = 50
    c.train.eval_every = 5000
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 2
    c.train.progress_bar = True
    # > 0: a Unix time; a stage that reaches it saves a checkpoint and stops (loop.DeadlineReached), for
    # time-boxed runs that resume later. SIGTERM/Ctrl-C likewise save the step they interrupt.
    c.train.deadline = 0.0
    # S3: keep the frozen teacher's outputs per training pair in host memory (up to this many GB) instead of
    # running it every step; exact, used only without augmentation (training/teacher_cache.py). 0: off.
    c.train.teacher_cache_gb = 4.0
    # ... or, when they do not fit in memory, on disk in <workdir>/teacher_cache/ (up to this many GB; 0: never)
    c.train.teacher_cache_disk_gb = 0.0
    # opt-in bfloat16 training on CPUs with AVX512-BF16 or AMX: the train step's convolutions (forward passes and
    # input gradients) round inputs and weights to bfloat16 with float32 sums; weight gradients, loss, parameters
    # and Adam stay float32; validation and inference stay float32. Refused elsewhere (docs/training.md).
    c.train.bf16 = False

    # --- the scheme: stages in order (Section III, Fig. 2) --------------------------------------------
    steps = 500_000
    c.pipeline = ("vm_h", "vm_l", "coop", "fst", "vm_l_crd")
    c.stages = ml_collections.ConfigDict()
    c.stages.vm_h = ml_collections.ConfigDict(
        {"kind": "baseline", "resolution": "high", "steps": steps, "init": "", "evaluate": True, "label": ""}
    )
    c.stages.vm_l = ml_collections.ConfigDict(
        {"kind": "baseline", "resolution": "low", "steps": steps, "init": "", "evaluate": True, "label": ""}
    )
    c.stages.coop = ml_collections.ConfigDict(  # S1: resolution cooperative training
        {"kind": "cooperative", "steps": steps, "init": "", "evaluate": False, "label": ""}
    )
    c.stages.fst = ml_collections.ConfigDict(  # S2: feature shift + fusion on the frozen S1 backbone
        {"kind": "teacher", "backbone": "coop", "steps": steps, "evaluate": True, "label": ""}
    )
    c.stages.vm_l_crd = ml_collections.ConfigDict(  # S3: distillation; the authors' code starts from VM-L
        {"kind": "distill", "teacher": "fst", "steps": steps, "init": "vm_l", "evaluate": True, "label": ""}
    )

    # --- fine-tuning a finished model on one's own scans (crd_jax/training/finetune.py) -----------------
    c.init_from = ""  # a shipped model's name or a model folder: fine-tune it on config.data.root
    c.finetune = ml_collections.ConfigDict({"steps": 1000, "val_subjects": 2})

    # --- evaluation (Section IV-C) ------------------------------------------------------------------
    c.eval = ml_collections.ConfigDict()
    c.eval.split = "test"
    c.eval.max_pairs = -1  # <= 0: every pair
    c.eval.val_pairs = 4  # pairs of the val split checked every eval_every steps
    c.eval.hd95 = False
    # after each distillation stage: ceilings, headroom, field distance, term gradients (training/diagnostics.py)
    c.eval.diagnostics = True
    c.eval.timing_repeats = 5

    # --- devices (multi-host through jax.distributed) ----------------------------------------------------
    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""  # e.g. "10.0.0.1:1234"; or JAX_COORDINATOR_ADDRESS
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    return c


# --- architectures of the paper (Section IV-D, Table III) --------------------------------------------------
VM_LIGHT = {"encoder": (16, 32, 32, 32), "decoder": ((32,), (32,), (32,), (32, 8), (8,))}  # VoxelMorph-1
VM_LIGHTER = {"encoder": (8, 16, 16, 16), "decoder": ((16,), (16,), (16,), (16, 4), (4,))}  # VM-light halved
VM_LARGE = {"encoder": (32, 64, 64, 64), "decoder": ((64,), (64,), (64,), (64, 64), (32, 32))}  # VM doubled (teacher B)
PYD = {"backbone": "pyramid", "encoder": (16, 32, 32, 32, 32), "encoder_strides": (1, 2, 2, 2, 2), "estimator": (32, 16)}
PYD_LIGHT = {"encoder": (8, 16, 16, 16, 16), "estimator": (16, 8)}
PYD_LIGHTER = {"encoder": (4, 8, 8, 8, 8), "estimator": (8, 4)}


def set_model(config: ml_collections.ConfigDict, **fields: Any) -> None:
    for k, v in fields.items():
        config.model[k] = v


def use_pyramid(config: ml_collections.ConfigDict, diffeomorphic: bool = False) -> None:
    """Pyd / Pyd-diff (after Dual-PRNet)."""
    set_model(config, **PYD, diffeomorphic=diffeomorphic)


def stage(kind: str, **fields: Any) -> ml_collections.ConfigDict:
    """A stage block with every field of its kind (so each can be overridden from the command line);
    ``model`` and ``loss`` (dicts) override the global model and loss for this stage only."""
    import dataclasses

    from crd_jax.training.stage_kinds import KINDS

    block = {"kind": kind, "steps": 500_000, "evaluate": True, "label": ""}
    for f in dataclasses.fields(KINDS[kind]) if kind in KINDS else ():
        if f.init and f.name not in block and f.name not in ("model", "loss") and f.default is not dataclasses.MISSING:
            block[f.name] = f.default
    for section in ("model", "loss"):
        if section in fields:
            fields[section] = ml_collections.ConfigDict(fields[section])
    block.update(fields)
    return ml_collections.ConfigDict(block)


def set_steps(config: ml_collections.ConfigDict, steps: int) -> None:
    """Gives every stage the same number of steps."""
    for name in config.pipeline:
        config.stages[name].steps = steps


def check_override(config: ml_collections.ConfigDict, dotted: str) -> None:
    """Raises a one-line :class:`InputError` when ``dotted`` (``train.lr``) names no field of ``config``,
    with the closest valid name (a misspelt field must not silently keep its default)."""
    import difflib

    from crd_jax.errors import InputError

    node, walked = config, []
    for part in dotted.split("."):
        fields = list(node.keys()) if isinstance(node, (ml_collections.ConfigDict, dict)) else []
        if part not in fields:
            close = difflib.get_close_matches(part, fields, n=1, cutoff=0.5)
            where = ".".join(walked) or "config"
            hint = f"; did you mean '{close[0]}'?" if close else f" (fields of {where}: {', '.join(sorted(fields)) or 'none'})"
            raise InputError(f"--config.{dotted}", f"{where} has no field '{part}'{hint}")
        node = node[part]
        walked.append(part)
