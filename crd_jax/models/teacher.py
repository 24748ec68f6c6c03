"""The feature-shifted teacher (FST, Section III-B): feature shift + feature fusion + a decoder.

A backbone trained by resolution cooperative training (eq. 4-6) runs on the high-resolution pair and on
the pair downsampled by ``n = 2^k``. Shifting the low-resolution model by ``k`` levels aligns the sizes:
``F^H_{l+k}`` and ``F^L_l`` both have ``1/2^(l+k)`` of the high-resolution input (Section III-B-2). Each
aligned pair is concatenated (``a + b`` channels: ``a`` from F^H, ``b`` from F^L) and fused by four 3^d
convolutions with LeakyReLU, ``a+b -> a+b`` three times then ``a+b -> b`` (Table I), so the teacher feature
``F^T_l`` has the student's channels and size. A decoder with the backbone's structure (its per-level
channel lists, the fused features in the role of the skip connections) maps ``{F^T_l}`` to ``phi^T`` on
the student's grid; ``up(phi^T)`` registers the high-resolution pair (eq. 7).

The backbone's parameters are an argument of :meth:`Teacher.apply`, separate from the head's, so that a
training stage can pass them as a frozen constant (no gradient, no optimizer state).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import flax.linen as nn
import jax

from crd_jax.compile import run_once
from crd_jax.models.layers import Conv, concat, decoder_level
from crd_jax.models.registrar import downsample_pair
from crd_jax.models.output import ModelOutput, as_output
from crd_jax.models.pyramid import PyramidEstimator
from crd_jax.models.voxelmorph import FlowHead
from crd_jax.ops.spatial import downsample_field, integrate_velocity, resize, resize_field, upsample_field
from crd_jax.typing import Params


def fusion_levels(high: Dict[int, jax.Array], low: Dict[int, jax.Array], shift: int) -> List[int]:
    """Student levels ``l`` that have a shifted partner ``F^H_{l+k}``; ordered deepest first."""
    levels = sorted((lev for lev in low if lev + shift in high), reverse=True)
    if not levels:
        raise ValueError(f"no feature level survives a shift of {shift} (k cannot exceed the number of levels)")
    return levels


class FeatureFusion(nn.Module):
    """Table I: ``concat(F^L_l, F^H_{l+k})`` -> 3 x conv(a+b) -> conv(b) (``convs = 4``).

    ``convs = 1`` keeps only the last conv(b): the size of the teacher the paper states (0.6M parameters)
    and the authors release (603,955), against 1.86M for the literal Table I head.
    """

    negative_slope: float = 0.2
    convs: int = 4

    @nn.compact
    def __call__(self, low: jax.Array, high: jax.Array) -> jax.Array:
        if low.shape[:-1] != high.shape[:-1]:
            raise ValueError(f"shifted features differ in size: {low.shape} vs {high.shape}")
        a, b = high.shape[-1], low.shape[-1]
        h = concat([low, high])
        for i in range(self.convs - 1):
            h = Conv(a + b, negative_slope=self.negative_slope, name=f"conv_{i}")(h)
        return Conv(b, negative_slope=self.negative_slope, name="conv_3")(h)


def fuse_shifted(
    high: Dict[int, jax.Array], low: Dict[int, jax.Array], shift: int, negative_slope: float, convs: int = 4
) -> Dict[int, jax.Array]:
    """``{l: F^T_l}``: Table I fusion of every shifted pair (called inside a head's ``compact`` method)."""
    return {
        lev: FeatureFusion(negative_slope, convs, name=f"fuse_{lev}")(low[lev], high[lev + shift])
        for lev in fusion_levels(high, low, shift)
    }


class FusionHead(nn.Module):
    """Feature fusion at every shifted level, then the backbone-shaped decoder to ``phi^T``.

    ``decoder``: the backbone's decoder channels, deepest level first (as in :class:`VoxelMorph`).
    Returns ``{"disp": phi^T, "features": {l: F^T_l}}`` (plus ``"velocity"`` when diffeomorphic).
    """

    decoder: Tuple[Tuple[int, ...], ...]
    shift: int = 1
    negative_slope: float = 0.2
    diffeomorphic: bool = False
    int_steps: int = 7
    fusion_convs: int = 4  # 4: Table I literally; 1: the paper's stated 0.6M teacher (fusion = "compact")
    # False: phi^T on the student's grid, up(phi^T) at the input's (the paper's text, "half ... upsample by 2").
    # True (``model.teacher_output = "full"``): the chain continues through the high-resolution features
    # F^H_{k-1} .. F^H_0 to phi^T at full resolution, as the authors' ``core/networks/voxelmorph_Hinput.py``
    # (one conv per level, the channels of F^H_l; nearest upsampling as in the rest of this decoder).
    full_resolution: bool = False

    @nn.compact
    def __call__(self, high: Dict[int, jax.Array], low: Dict[int, jax.Array]) -> Dict:
        deepest = len(self.decoder) - 1
        channels = {deepest - j: ch for j, ch in enumerate(self.decoder)}
        fused = fuse_shifted(high, low, self.shift, self.negative_slope, self.fusion_convs)
        h = None
        for lev in sorted(fused, reverse=True):
            # the deepest level starts from F^T_l, the others read concat(up(h), F^T_l) fused (decoder_level)
            skip = None if h is None else fused[lev]
            h = decoder_level(fused[lev] if h is None else h, skip, channels[lev], lev, self.negative_slope)
        if self.full_resolution:
            # student level 0 sits on high level k: continue through F^H_{k-1} .. F^H_0, each conv reading
            # concat(up(h), F^H_l) fused as above (at full resolution the stored concatenation and its gradient
            # were most of this head's time)
            for lev in range(self.shift - 1, -1, -1):
                skip = high[lev]
                h = Conv(skip.shape[-1], negative_slope=self.negative_slope, name=f"full_{lev}")(h, skip)
        flow = FlowHead(name="flow")(h)
        if self.diffeomorphic:
            return ModelOutput(disp=integrate_velocity(flow, self.int_steps), velocity=flow, features=fused)
        return ModelOutput(disp=flow, features=fused)


class PyramidFusionHead(nn.Module):
    """FST for pyramid backbones: Table I fusion at every shifted level of the two-stream features, then a
    coarse-to-fine estimator with the backbone's structure, which gives the intermediate teacher fields
    ``phi^T_l`` that eq. 11 distils."""

    estimator: Tuple[int, ...] = (32, 16)
    shift: int = 1
    negative_slope: float = 0.2
    diffeomorphic: bool = False
    int_steps: int = 7

    @nn.compact
    def __call__(self, high: Dict[int, jax.Array], low: Dict[int, jax.Array]) -> Dict:
        fused = fuse_shifted(high, low, self.shift, self.negative_slope)
        out = PyramidEstimator(self.estimator, self.negative_slope, self.diffeomorphic, self.int_steps, name="estimator")(fused)
        return out.replace(features=fused)


class OfficialFusionHead(nn.Module):
    """The fusion decoder of the authors' released code (``fusion = "official"``; k = 1).

    Coarse to fine, one conv per level: ``fuse5 = conv(concat(F^L_3, F^H_4))``, then for the high-resolution
    levels 3, 2, 1: ``conv(concat(up(previous), F^L_{l-1}, F^H_l))``, then at full size
    ``conv(concat(up(previous), F^H_0))`` and a flow conv. ``up`` is linear with aligned corners, as in
    their code. The field is at the high resolution; the features distilled are the fused ones at the
    student's levels 3..0 (their channels differ from the student's: distil attention maps).
    """

    channels: Tuple[int, ...] = (32, 32, 32, 32, 16)  # fuse5 .. fuse1
    negative_slope: float = 0.2
    full_resolution = True  # predicts phi^T at the high resolution (the other heads: on the student's grid)

    @nn.compact
    def __call__(self, high: Dict[int, jax.Array], low: Dict[int, jax.Array]) -> Dict:
        deepest = max(high)
        if sorted(high) != list(range(deepest + 1)) or len(self.channels) != deepest + 1:
            raise ValueError("the official fusion head expects decoder features at every level and one channel count per level")
        h = Conv(self.channels[0], negative_slope=self.negative_slope, name=f"fuse_{deepest}")(
            concat([low[deepest - 1], high[deepest]])
        )
        features = {deepest - 1: h}
        for i, lev in enumerate(range(deepest - 1, 0, -1), start=1):
            up = resize(h, high[lev].shape[1:-1], align_corners=True)
            h = Conv(self.channels[i], negative_slope=self.negative_slope, name=f"fuse_{lev}")(
                concat([up, low[lev - 1], high[lev]])
            )
            features[lev - 1] = h
        up = resize(h, high[0].shape[1:-1], align_corners=True)
        h = Conv(self.channels[-1], negative_slope=self.negative_slope, name="fuse_0")(concat([up, high[0]]))
        return ModelOutput(disp=FlowHead(name="flow")(h), features=features)


@dataclasses.dataclass(frozen=True)
class Teacher:
    """FST: backbone (frozen in use) at high and low resolution + a fusion head.

    ``apply(params, moving, fixed)`` with ``params = {"backbone": ..., "head": ...}`` returns
    ``{"disp": up(phi^T), "disp_low": phi^T, "features": {l: F^T_l}}`` (a head predicting at full size, the
    official one, gives ``disp`` directly and ``disp_low`` by downsampling it).
    """

    backbone: nn.Module
    head: nn.Module
    factor: int = 2
    align_corners: bool = False  # how the low-resolution input is made (the authors' teacher: True)

    @property
    def shift(self) -> int:
        return self.factor.bit_length() - 1

    def backbone_features(
        self, backbone_params: Params, moving: jax.Array, fixed: jax.Array
    ) -> Tuple[Dict[int, jax.Array], Dict[int, jax.Array]]:
        """``(F^H, F^L)``: the backbone's decoder features at both resolutions."""
        high = as_output(self.backbone.apply({"params": backbone_params}, moving, fixed)).features
        m, f = downsample_pair(moving, fixed, self.factor, self.align_corners)
        low = as_output(self.backbone.apply({"params": backbone_params}, m, f)).features
        return high, low

    def init_head(self, key: jax.Array, backbone_params: Params, moving: jax.Array, fixed: jax.Array) -> Params:
        def init(k, bp, m, f):
            high, low = self.backbone_features(bp, m, f)
            return self.head.init(k, high, low)["params"]

        return run_once(init, key, backbone_params, moving, fixed)

    def apply(
        self, params: Params, moving: jax.Array, fixed: jax.Array, backbone_features: Optional[tuple] = None
    ) -> ModelOutput:
        high, low = backbone_features or self.backbone_features(params["backbone"], moving, fixed)
        out = as_output(self.head.apply({"params": params["head"]}, high, low))
        if getattr(self.head, "full_resolution", False):
            return out.replace(disp_low=downsample_field(out.disp, self.factor))
        return out.replace(disp_low=out.disp, disp=upsample_field(out.disp, self.factor))


@dataclasses.dataclass(frozen=True)
class ResampledTeacher:
    """Any registrar used as a teacher for a student at another resolution (teachers A-D, Table VI/VII).

    Its field (and pyramid fields) are resampled onto the student's grid (values rescaled, as ``up(.)``);
    with ``features = "downsample"`` its decoder features are linearly resized to the student's feature sizes
    (the paper's "feature down", which it shows to hurt), otherwise no features are distilled.
    """

    registrar: object
    student_factor: int
    features: str = "none"

    def apply(self, params: Params, moving: jax.Array, fixed: jax.Array) -> ModelOutput:
        if self.features not in ("none", "downsample"):
            raise ValueError(f"teacher_features must be 'none' or 'downsample', got {self.features!r}")
        out = self.registrar.apply(params, moving, fixed)
        low = tuple(s // self.student_factor for s in moving.shape[1:-1])
        fields = None
        if out.fields is not None:
            fields = {l: resize_field(v, tuple(s // 2**l for s in low)) for l, v in out.fields.items()}
        features = {}
        if self.features == "downsample":
            features = {l: resize(v, tuple(s // 2**l for s in low)) for l, v in out.features.items()}
        return ModelOutput(disp=out.disp, disp_low=resize_field(out.disp_low, low), fields=fields, features=features)
