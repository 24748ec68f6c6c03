"""Models from configuration dicts (the ``model`` block of a config, or a saved ``model.json``)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Mapping, Union

from crd_jax.models import backbones
from crd_jax.models.affine import AffineNet, AffineThenDeformable
from crd_jax.models.cascade import Cascade
from crd_jax.models.pyramid import Pyramid
from crd_jax.models.registrar import Registrar
from crd_jax.models.teacher import FusionHead, OfficialFusionHead, PyramidFusionHead, Teacher
from crd_jax.models.voxelmorph import VoxelMorph, encoder_levels

if TYPE_CHECKING:
    import flax.linen as nn


def _tuple(v):
    return tuple(_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v


def _common(arch, name):
    return dict(
        negative_slope=float(arch["negative_slope"]),
        diffeomorphic=bool(arch["diffeomorphic"]),
        int_steps=int(arch["int_steps"]),
        name=name,
    )


def _build_voxelmorph(arch, name=None):
    return VoxelMorph(
        encoder=_tuple(arch["encoder"]),
        encoder_strides=_tuple(arch["encoder_strides"]),
        decoder=_tuple(arch["decoder"]),
        encoder_pooling=str(arch["encoder_pooling"]),
        **_common(arch, name),
    )


def _build_pyramid(arch, name=None):
    return Pyramid(
        encoder=_tuple(arch["encoder"]),
        encoder_strides=_tuple(arch["encoder_strides"]),
        estimator=_tuple(arch["estimator"]),
        **_common(arch, name),
    )


def _vm_fst_head(arch, factor: int):
    fusion = arch.get("fusion", "paper")
    output = teacher_output(arch)
    if fusion in ("paper", "compact"):
        return FusionHead(
            decoder=_tuple(arch["decoder"]),
            shift=int(factor).bit_length() - 1,
            negative_slope=float(arch["negative_slope"]),
            diffeomorphic=bool(arch["diffeomorphic"]),
            int_steps=int(arch["int_steps"]),
            fusion_convs=4 if fusion == "paper" else 1,
            full_resolution=output == "full",
        )
    if fusion == "official":
        if int(factor) != 2 or arch["diffeomorphic"]:
            raise ValueError("the official fusion head exists for n = 2 and displacement (non-diffeomorphic) models")
        return OfficialFusionHead(negative_slope=float(arch["negative_slope"]))
    raise ValueError(f"unknown fusion {fusion!r} (paper, compact, official)")


TEACHER_OUTPUTS = ("half", "full")


def teacher_output(arch: Mapping[str, Any]) -> str:
    """``model.teacher_output``: where the FST predicts phi^T. ``"half"`` (the paper's text): on the student's
    grid, upsampled; ``"full"`` (the authors' code): at the input's resolution through the finest F^H levels.
    The ``official`` fusion head is always ``full``; pyramid heads have ``half`` only."""
    value = str(arch.get("teacher_output", "half"))
    if value not in TEACHER_OUTPUTS:
        raise ValueError(f"teacher_output must be 'half' or 'full', got {value!r}")
    return value


def _pyramid_fst_head(arch, factor: int):
    if arch.get("fusion", "paper") != "paper":
        raise ValueError("pyramid backbones have the paper's fusion only")
    if teacher_output(arch) != "half":
        raise ValueError("pyramid FST heads predict on the student's grid only (teacher_output = 'half')")
    return PyramidFusionHead(
        estimator=_tuple(arch["estimator"]),
        shift=int(factor).bit_length() - 1,
        negative_slope=float(arch["negative_slope"]),
        diffeomorphic=bool(arch["diffeomorphic"]),
        int_steps=int(arch["int_steps"]),
    )


def _encoder_levels(arch):
    return encoder_levels(_tuple(arch["encoder_strides"]))


backbones.register_backbone(
    backbones.BackboneEntry(
        "voxelmorph",
        {
            "encoder": [16, 32, 32, 32],
            "encoder_strides": [2, 2, 2, 2],
            "decoder": [[32], [32], [32], [32, 32], [16, 16]],
            "encoder_pooling": "stride",
        },
        _build_voxelmorph,
        _encoder_levels,
        "VM",
        _vm_fst_head,
    )
)
backbones.register_backbone(
    backbones.BackboneEntry(
        "pyramid",
        {"encoder": [16, 32, 32, 32, 32], "encoder_strides": [1, 2, 2, 2, 2], "estimator": [32, 16]},
        _build_pyramid,
        _encoder_levels,
        "Pyd",
        _pyramid_fst_head,
    )
)
backbones.register_backbone(
    backbones.BackboneEntry("affine", {}, lambda arch, name=None: affine_net(arch), lambda arch: 0, "Affine", None)
)


def architecture(model_cfg: Mapping[str, Any]) -> dict:
    """The architecture fields of a model config as plain JSON-able values."""
    return backbones.architecture(model_cfg)


def _single_backbone(arch: Mapping[str, Any], name=None):
    return backbones.entry(arch).build(arch, name)


def _frozen_arch(arch: Mapping[str, Any]):
    return tuple(sorted((k, _tuple(v)) for k, v in arch.items()))


def _make_single(frozen_arch, name=None):
    return _single_backbone(dict(frozen_arch), name=name)


def affine_net(arch: Mapping[str, Any]) -> AffineNet:
    return AffineNet(
        channels=_tuple(arch.get("affine_channels", backbones.COMMON["affine_channels"])),
        negative_slope=float(arch["negative_slope"]),
    )


def deformable_from_config(arch: Mapping[str, Any]) -> nn.Module:
    """The deformable part: one backbone, or a cascade of ``arch["cascade"]`` copies (teacher C)."""
    count = int(arch.get("cascade", 1))
    if count > 1:
        return Cascade(functools.partial(_make_single, _frozen_arch(arch)), count)
    return _single_backbone(arch)


def backbone_from_config(arch: Mapping[str, Any]) -> nn.Module:
    """The network a registrar runs: ``backbone = "affine"`` alone, or the deformable model, with an affine
    network in front when ``affine`` is ``"joint"`` (trained together) or ``"stage"`` (pre-trained, frozen)."""
    backbones.check_architecture(arch)
    if arch.get("backbone") == "affine":
        return affine_net(arch)
    deformable = deformable_from_config(arch)
    if arch.get("affine", "none") in ("joint", "stage"):
        return AffineThenDeformable(affine_net(arch), deformable)
    if arch.get("affine", "none") != "none":
        raise ValueError(f"affine must be none, joint or stage, got {arch.get('affine')!r}")
    return deformable


def levels(arch: Mapping[str, Any]) -> int:
    """Number of stride-2 levels of the backbone (canvas sides divide by ``2^(levels + k)``)."""
    return backbones.entry(arch).levels(arch)


def registrar_from_config(arch: Mapping[str, Any], factor: int) -> Registrar:
    return Registrar(backbone_from_config(arch), factor=int(factor))


def teacher_from_config(arch: Mapping[str, Any], factor: int) -> Teacher:
    """The FST for a backbone, with the head its registry entry builds (VM: ``fusion = "paper"``, Table I +
    backbone-shaped decoder; ``"compact"``, one fusion conv per level; ``"official"``, the authors' code)."""
    backbones.check_architecture(arch)
    make_head = backbones.entry(arch).fst_head
    if make_head is None:
        raise ValueError(f"backbone {arch.get('backbone')!r} has no FST head")
    return Teacher(
        backbone_from_config(arch),
        make_head(arch, int(factor)),
        factor=int(factor),
        align_corners=bool(arch.get("teacher_align_corners", False)),
    )


def spec_architecture(spec: Mapping[str, Any]) -> dict:
    """A saved model's architecture. Format-1 folders (earlier releases) stored every backbone's fields in
    one flat list: the fields foreign to their backbone are dropped; format 2 must be exact."""
    arch = dict(spec["architecture"])
    if int(spec.get("format_version", 2)) < 2:
        known = {**backbones.COMMON, **backbones.entry(arch).fields}
        arch = {k: v for k, v in arch.items() if k in known}
    return arch


def model_from_spec(spec: Mapping[str, Any]) -> Union[Registrar, Teacher]:
    """``spec = {"kind": "registrar" | "teacher", "architecture": {...}, "factor": n}``."""
    kind = spec["kind"]
    arch = spec_architecture(spec)
    if kind == "registrar":
        return registrar_from_config(arch, spec["factor"])
    if kind == "teacher":
        return teacher_from_config(arch, spec["factor"])
    raise ValueError(f"unknown model kind {kind!r}")
