"""The authors' released CRD models (BlaiseBrain/CRD_registration, PyTorch 1.1) as crd-jax models.

Their "VMdalca1" network is a configuration of our :class:`~crd_jax.models.VoxelMorph`: encoder
``(16, 32, 32, 32, 32)`` with strides ``(1, 2, 2, 2, 2)``, decoder ``((32,), (32,), (32,), (32, 16), (16,))``.
Their teacher adds the coarse-to-fine fusion decoder (``fusion = "official"``) and builds its low-resolution
input with ``align_corners=True``.

This module owns every difference of convention, and nothing else in the code base knows about them:

* their arrays are the NIfTI axes reversed ((D, H, W) for NIfTI (X, Y, Z)), so a conv weight
  ``(out, in, kD, kH, kW)`` becomes our ``(kX, kY, kZ, in, out)`` by reversing all five axes;
* their flow channels are (x, y, z) = displacements along (W, H, D) = NIfTI (X, Y, Z): our channel order;
* their network input is ``concat([fixed, moving])``, ours ``concat([moving, fixed])``: the first conv's
  input channels are swapped;
* their training space (:data:`TRAINING_SPACE`), recorded in ``model.json`` so that registration reorients and
  resamples an input into it as for the shipped models.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import TYPE_CHECKING, Any, Dict, Mapping, Tuple

import numpy as np

from crd_jax.errors import InputError

if TYPE_CHECKING:
    from crd_jax.typing import Params

ARCHITECTURE = {
    "backbone": "voxelmorph",
    "encoder": [16, 32, 32, 32, 32],
    "encoder_strides": [1, 2, 2, 2, 2],
    "decoder": [[32], [32], [32], [32, 16], [16]],
    "negative_slope": 0.2,
    "diffeomorphic": False,
    "int_steps": 7,
    "encoder_pooling": "stride",
    "fusion": "official",
    "teacher_align_corners": True,
}

# their layer -> our module path (backbone)
BACKBONE_LAYERS = {
    "conv1": ("unet", "enc_0"),
    "conv2": ("unet", "enc_1"),
    "conv3": ("unet", "enc_2"),
    "conv4": ("unet", "enc_3"),
    "conv5": ("unet", "enc_4"),
    "decode5": ("unet", "dec_4_0"),
    "decode4": ("unet", "dec_3_0"),
    "decode3": ("unet", "dec_2_0"),
    "decode2": ("unet", "dec_1_0"),
    "decode2_1": ("unet", "dec_1_1"),
    "decode1": ("unet", "dec_0_0"),
    "flow": ("flow", "conv"),
}
HEAD_LAYERS = {
    "fuse5": ("fuse_4",),
    "fuse4": ("fuse_3",),
    "fuse3": ("fuse_2",),
    "fuse2": ("fuse_1",),
    "fuse1": ("fuse_0",),
    "flow_f": ("flow", "conv"),
}
PREFIX = "module.defnet_0."

# The space the authors trained in: neurite-oasis ``aligned_norm.nii.gz`` (FreeSurfer norm.mgz, skull-stripped,
# affinely aligned, cropped), 160x192x224 voxels of 1 mm, stored with the affine
# [[-1, 0, 0, 80], [0, 0, 1, -112], [0, -1, 0, 96]]: nibabel's ``aff2axcodes`` gives L, I, A (FreeSurfer's
# conformed orientation). Their (D, H, W) arrays are those NIfTI axes reversed and the weights above are mapped
# back onto NIfTI order, so the converted network sees arrays in that stored order: LIA. (Checked on the
# reference pair's crops, reversed into NIfTI order: axis 0 is the mirror-symmetric one, left-right; along axis 1
# the corpus callosum comes before the brainstem, superior -> inferior; along axis 2 the splenium comes first and
# the fornix runs from it towards higher indices, posterior -> anterior.)
TRAINING_SPACE = {"orientation": "LIA", "spacing": [1.0, 1.0, 1.0], "stored_shape": [160, 192, 224]}
# Intensities as stored, in [0, 1] (0-255 / 255), no normalisation. The statistics that the input checks compare
# with (crd_jax.registration.checks), from the two subjects of the authors' reference pair
# (shared/official_crd/reference_io.npz, fixed and moving crops of 64x96x64 voxels at the volume's centre):
# - p99, the 99th percentile: 0.4275 in both crops (109/255). A whole volume, mostly background, has a somewhat
#   lower one; check_intensities allows a factor of 4 either way.
# - fg_median_ratio, the foreground median / the 99th percentile: 0.679 and 0.725, mean 0.702 (it does not depend
#   on how much background a crop holds).
TRAINING_INTENSITY = {"p99": 0.4275, "fg_median_ratio": 0.702}


def _kernel(w: np.ndarray) -> np.ndarray:
    """(out, in, kD, kH, kW) over their (D, H, W) axes -> (kX, kY, kZ, in, out) over NIfTI (X, Y, Z)."""
    return np.ascontiguousarray(np.transpose(w, (4, 3, 2, 1, 0)), dtype=np.float32)


def _put(tree: Dict, path, value) -> None:
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


def _convert_layers(state: Mapping[str, np.ndarray], layers: Dict, source: str) -> Dict:
    params: Dict = {}
    for theirs, ours in layers.items():
        try:
            w = np.asarray(state[PREFIX + theirs + ".weight"])
            b = np.asarray(state[PREFIX + theirs + ".bias"])
        except KeyError:
            raise InputError(source, f"not an official CRD checkpoint of this kind (missing layer '{theirs}')") from None
        if w.ndim != 5:
            raise InputError(source, f"layer '{theirs}' is not a 3-D convolution (weight shape {w.shape})")
        kernel = _kernel(w)
        if theirs == "conv1":
            kernel = kernel[..., ::-1, :].copy()  # their input is (fixed, moving); ours (moving, fixed)
        _put(params, ours + ("kernel",), kernel)
        _put(params, ours + ("bias",), b.astype(np.float32))
    return params


def convert(state: Mapping[str, np.ndarray], kind: str, source: str = "checkpoint") -> Tuple[Params, Dict[str, Any]]:
    """``(params, spec)`` for ``kind = "student"`` (a registrar, factor 2) or ``"teacher"``."""
    keys = set(state)
    has_fusion = any(k.startswith(PREFIX + "fuse") for k in keys)
    if kind == "student":
        if has_fusion:
            raise InputError(source, "this is a teacher checkpoint (it has fusion layers); use --kind teacher")
        params = _convert_layers(state, BACKBONE_LAYERS, source)
        spec = {"kind": "registrar", "factor": 2, "label": "VM-L-CRD (official)"}
    elif kind == "teacher":
        if not has_fusion:
            raise InputError(source, "this is not a teacher checkpoint (no fusion layers); use --kind student")
        params = {
            "backbone": _convert_layers(state, BACKBONE_LAYERS, source),
            "head": _convert_layers(state, HEAD_LAYERS, source),
        }
        spec = {"kind": "teacher", "factor": 2, "label": "FST (official)"}
    else:
        raise InputError(kind, "kind must be 'student' or 'teacher'")
    expected = {PREFIX + n + s for n in BACKBONE_LAYERS for s in (".weight", ".bias")}
    if kind == "teacher":
        expected |= {PREFIX + n + s for n in HEAD_LAYERS for s in (".weight", ".bias")}
    unknown = sorted(keys - expected)
    if unknown:
        raise InputError(source, f"unexpected layers for an official {kind}: {unknown[:4]}")
    spec.update(
        architecture=dict(ARCHITECTURE),
        stage="convert-official",
        # The authors feed OASIS intensities in [0, 1] as stored: no normalisation; 1 mm, as their network ran.
        preprocessing={
            "normalize": "none",
            "percentiles": [0.5, 99.5],
            "resample_shape": [],
            "multiple": 32,
            "ndim": 3,
            "geometry": dict(TRAINING_SPACE),
            "intensity": dict(TRAINING_INTENSITY),
        },
        card=card(source),
    )
    return params, spec


def card(source: str) -> Dict[str, str]:
    """What a user should know of the converted model, recorded in its ``model.json``."""
    grid = "x".join(map(str, TRAINING_SPACE["stored_shape"]))
    return {
        "training_data": "OASIS (neurite-oasis aligned_norm), the authors' release",
        "grid": f"{grid} voxels of 1 mm, {TRAINING_SPACE['orientation']}; inputs are reoriented and resampled to 1 mm",
        "preprocessing": "skull-stripped (FreeSurfer norm), affinely aligned, intensities in [0, 1] as stored (no normalisation)",
        "licence": "no licence stated by the authors; for local checks",
        "source_checkpoint": PurePath(str(source)).name,
    }
