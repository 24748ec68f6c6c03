"""Models from configuration dicts (the ``model`` block of a config, or a saved ``model.json``)."""

from __future__ import annotations

import functools
from typing import Any, Mapping

from crd_jax.models.affine import AffineNet, AffineThenDeformable
from crd_jax.models.cascade import Cascade
from crd_jax.models.pyramid import Pyramid
from crd_jax.models.registrar import Registrar
from crd_jax.models.teacher import FusionHead, OfficialFusionHead, PyramidFusionHead, Teacher
from crd_jax.models.voxelmorph import VoxelMorph, encoder_levels

BACKBONES = ("voxelmorph", "pyramid", "affine")
DEFAULTS = {
    "encoder_pooling": "stride",
    "fusion": "paper",
    "teacher_align_corners": False,
    "estimator": [32, 16],
    "cascade": 1,
    "affine": "none",
    "affine_channels": [16, 32, 64, 128, 256],
}


def _tuple(v):
    return tuple(_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v


def architecture(model_cfg: Mapping[str, Any]) -> dict:
    """The architecture fields of a model config as plain JSON-able values."""
    keys = ("backbone", "encoder", "encoder_strides", "decoder", "negative_slope", "diffeomorphic", "int_steps") + tuple(DEFAULTS)
    out = {}
    for k in keys:
        v = model_cfg.get(k, DEFAULTS[k]) if k in DEFAULTS else model_cfg[k]
        out[k] = [list(x) for x in v] if k == "decoder" else (list(v) if isinstance(v, (list, tuple)) else v)
    return out


def _single_backbone(arch: Mapping[str, Any], name=None):
    kind = arch.get("backbone", "voxelmorph")
    common = dict(negative_slope=float(arch["negative_slope"]), diffeomorphic=bool(arch["diffeomorphic"]),
                  int_steps=int(arch["int_steps"]), name=name)
    if kind == "voxelmorph":
        return VoxelMorph(encoder=_tuple(arch["encoder"]), encoder_strides=_tuple(arch["encoder_strides"]),
                          decoder=_tuple(arch["decoder"]), encoder_pooling=str(arch.get("encoder_pooling", "stride")), **common)
    if kind == "pyramid":
        return Pyramid(encoder=_tuple(arch["encoder"]), encoder_strides=_tuple(arch["encoder_strides"]),
                       estimator=_tuple(arch.get("estimator", DEFAULTS["estimator"])), **common)
    raise ValueError(f"unknown backbone {kind!r} (choose from {BACKBONES})")


def _frozen_arch(arch: Mapping[str, Any]):
    return tuple(sorted((k, _tuple(v)) for k, v in arch.items()))


def _make_single(frozen_arch, name=None):
    return _single_backbone(dict(frozen_arch), name=name)


def affine_net(arch: Mapping[str, Any]) -> AffineNet:
    return AffineNet(channels=_tuple(arch.get("affine_channels", DEFAULTS["affine_channels"])),
                     negative_slope=float(arch["negative_slope"]))


def deformable_from_config(arch: Mapping[str, Any]):
    """The deformable part: one backbone, or a cascade of ``arch["cascade"]`` copies (teacher C)."""
    count = int(arch.get("cascade", 1))
    if count > 1:
        return Cascade(functools.partial(_make_single, _frozen_arch(arch)), count)
    return _single_backbone(arch)


def backbone_from_config(arch: Mapping[str, Any]):
    """The network a registrar runs: ``backbone = "affine"`` alone, or the deformable model, with an affine
    network in front when ``affine`` is ``"joint"`` (trained together) or ``"stage"`` (pre-trained, frozen)."""
    if arch.get("backbone") == "affine":
        return affine_net(arch)
    deformable = deformable_from_config(arch)
    if arch.get("affine", "none") in ("joint", "stage"):
        return AffineThenDeformable(affine_net(arch), deformable)
    if arch.get("affine", "none") != "none":
        raise ValueError(f"affine must be none, joint or stage, got {arch.get('affine')!r}")
    return deformable


def levels(arch: Mapping[str, Any]) -> int:
    """Number of stride-2 levels of the backbone's encoder."""
    return encoder_levels(_tuple(arch["encoder_strides"]))


def registrar_from_config(arch: Mapping[str, Any], factor: int) -> Registrar:
    return Registrar(backbone_from_config(arch), factor=int(factor))


def teacher_from_config(arch: Mapping[str, Any], factor: int) -> Teacher:
    """The FST for a backbone: ``fusion = "paper"`` (Table I + backbone-shaped decoder), ``"compact"`` (one
    fusion conv per level, the paper's stated 0.6M teacher) or ``"official"`` (the authors' code, n = 2)."""
    fusion = arch.get("fusion", "paper")
    if arch.get("backbone") == "pyramid":
        if fusion != "paper":
            raise ValueError("pyramid backbones have the paper's fusion only")
        head = PyramidFusionHead(
            estimator=_tuple(arch.get("estimator", DEFAULTS["estimator"])),
            shift=int(factor).bit_length() - 1,
            negative_slope=float(arch["negative_slope"]),
            diffeomorphic=bool(arch["diffeomorphic"]),
            int_steps=int(arch["int_steps"]),
        )
    elif fusion in ("paper", "compact"):
        head = FusionHead(
            fusion_convs=4 if fusion == "paper" else 1,
            decoder=_tuple(arch["decoder"]),
            shift=int(factor).bit_length() - 1,
            negative_slope=float(arch["negative_slope"]),
            diffeomorphic=bool(arch["diffeomorphic"]),
            int_steps=int(arch["int_steps"]),
        )
    elif fusion == "official":
        if int(factor) != 2 or arch["diffeomorphic"]:
            raise ValueError("the official fusion head exists for n = 2 and displacement (non-diffeomorphic) models")
        head = OfficialFusionHead(negative_slope=float(arch["negative_slope"]))
    else:
        raise ValueError(f"unknown fusion {fusion!r} (paper, compact, official)")
    return Teacher(backbone_from_config(arch), head, factor=int(factor), align_corners=bool(arch.get("teacher_align_corners", False)))


def model_from_spec(spec: Mapping[str, Any]):
    """``spec = {"kind": "registrar" | "teacher", "architecture": {...}, "factor": n}``."""
    kind = spec["kind"]
    if kind == "registrar":
        return registrar_from_config(spec["architecture"], spec["factor"])
    if kind == "teacher":
        return teacher_from_config(spec["architecture"], spec["factor"])
    raise ValueError(f"unknown model kind {kind!r}")
