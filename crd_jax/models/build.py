"""Models from configuration dicts (the ``model`` block of a config, or a saved ``model.json``)."""

from __future__ import annotations

from typing import Any, Mapping

from crd_jax.models.registrar import Registrar
from crd_jax.models.teacher import FusionHead, OfficialFusionHead, Teacher
from crd_jax.models.voxelmorph import VoxelMorph, encoder_levels

BACKBONES = ("voxelmorph",)


def _tuple(v):
    return tuple(_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v


def architecture(model_cfg: Mapping[str, Any]) -> dict:
    """The architecture fields of a model config as plain JSON-able values."""
    keys = ("backbone", "encoder", "encoder_strides", "decoder", "negative_slope", "diffeomorphic", "int_steps",
            "encoder_pooling", "fusion", "teacher_align_corners")
    defaults = {"encoder_pooling": "stride", "fusion": "paper", "teacher_align_corners": False}
    out = {}
    for k in keys:
        v = model_cfg.get(k, defaults[k]) if k in defaults else model_cfg[k]
        out[k] = [list(x) for x in v] if k == "decoder" else (list(v) if isinstance(v, (list, tuple)) else v)
    return out


def backbone_from_config(arch: Mapping[str, Any]):
    kind = arch.get("backbone", "voxelmorph")
    if kind != "voxelmorph":
        raise ValueError(f"unknown backbone {kind!r} (choose from {BACKBONES})")
    return VoxelMorph(
        encoder=_tuple(arch["encoder"]),
        encoder_strides=_tuple(arch["encoder_strides"]),
        decoder=_tuple(arch["decoder"]),
        negative_slope=float(arch["negative_slope"]),
        diffeomorphic=bool(arch["diffeomorphic"]),
        int_steps=int(arch["int_steps"]),
        encoder_pooling=str(arch.get("encoder_pooling", "stride")),
    )


def levels(arch: Mapping[str, Any]) -> int:
    """Number of stride-2 levels of the backbone's encoder."""
    return encoder_levels(_tuple(arch["encoder_strides"]))


def registrar_from_config(arch: Mapping[str, Any], factor: int) -> Registrar:
    return Registrar(backbone_from_config(arch), factor=int(factor))


def teacher_from_config(arch: Mapping[str, Any], factor: int) -> Teacher:
    """The FST for a backbone: ``fusion = "paper"`` (Table I + backbone-shaped decoder) or ``"official"``."""
    fusion = arch.get("fusion", "paper")
    if fusion == "paper":
        head = FusionHead(
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
        raise ValueError(f"unknown fusion {fusion!r} (paper, official)")
    return Teacher(backbone_from_config(arch), head, factor=int(factor), align_corners=bool(arch.get("teacher_align_corners", False)))


def model_from_spec(spec: Mapping[str, Any]):
    """``spec = {"kind": "registrar" | "teacher", "architecture": {...}, "factor": n}``."""
    kind = spec["kind"]
    if kind == "registrar":
        return registrar_from_config(spec["architecture"], spec["factor"])
    if kind == "teacher":
        return teacher_from_config(spec["architecture"], spec["factor"])
    raise ValueError(f"unknown model kind {kind!r}")
