"""Registration losses (paper Section III-A), N-d, channels-last ``(B, *spatial, C)``.

* :func:`ncc` is L_sim of eq. 1 (negative local normalised cross-correlation over a ``9^d`` window,
  from separable box sums).
* :func:`grad_l2` is L_reg of eq. 2.
* :func:`mse` is the distillation distance of eq. 8-9; :func:`soft_dice` an overlap score for label maps.
* :func:`mind_loss` (MIND-SSC) and :func:`nmi` replace NCC as L_sim for multi-modal pairs
  (``config.loss.similarity``). Similarities are a registry (:data:`SIMILARITIES`): a new one is one
  :class:`Similarity` subclass passed to :func:`register_similarity`, then usable by name from a config.
* :func:`label_dice_loss` is the label-supervised term of VoxelMorph's semi-supervised mode
  (``config.loss.label_weight``); :class:`Objective` is eq. 3 with every term the config asks for.

Normalisation follows VoxelMorph (whose ``lambda = 1`` the paper adopts): eq. 1 and eq. 2 are written as
sums over voxels, the code averages over voxels so that ``lambda`` does not depend on the image size.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar, Dict, Optional, Tuple, Type

import jax
import jax.numpy as jnp

from crd_jax.ops import grad_l2 as _grad_l2
from crd_jax.ops import ncc as _ncc
from crd_jax.ops.ncc import box_sum  # noqa: F401 (part of this module's API; mind_ssc uses it)
from crd_jax.ops.spatial import warp


def ncc(fixed: jax.Array, warped: jax.Array, window: int = 9, eps: float = 1e-5) -> jax.Array:
    """L_sim of eq. 1: minus the local (windowed) squared normalised cross-correlation, averaged.

    For every voxel p, with sums over the ``window^d`` box A(p) (zeros beyond the border, ``|A| = window^d``
    as in VoxelMorph): ``cc(p) = cross^2 / (var_f * var_m + eps)`` with
    ``cross = sum (f - mean_f)(m - mean_m)``, ``var = sum (x - mean)^2``. Returns ``-mean_p cc(p)``.

    Float32 2-D and 3-D images on the CPU run the fused native kernel (``crd_jax.ops.ncc``; its
    ``ncc_formulation("xla")`` selects the ``reduce_window`` reference, :func:`crd_jax.ops.ncc.ncc_reference`).
    """
    if fixed.shape != warped.shape:
        raise ValueError(f"ncc: shapes differ, {fixed.shape} vs {warped.shape}")
    return _ncc.ncc(fixed, warped, window, eps)


def grad_l2(disp: jax.Array) -> jax.Array:
    """L_reg of eq. 2: squared forward differences of the field, mean per axis, averaged over axes.

    Float32 2-D and 3-D fields on the CPU run the native kernel (``crd_jax.ops.grad_l2``; its
    ``grad_l2_formulation("xla")`` selects the ``jnp.diff`` reference, :func:`crd_jax.ops.grad_l2.grad_l2_reference`).
    """
    return _grad_l2.grad_l2(disp)


def mse(a: jax.Array, b: jax.Array) -> jax.Array:
    """Mean squared error (eq. 8 and eq. 9 of the distillation)."""
    if a.shape != b.shape:
        raise ValueError(f"mse: shapes differ, {a.shape} vs {b.shape}")
    return jnp.mean((a - b) ** 2)


def soft_dice(y_true: jax.Array, y_pred: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Mean soft Dice coefficient of one-hot / probability maps ``(B, *spatial, L)``, in [0, 1].

    Averaged over batch and labels; a loss is ``1 - soft_dice``.
    """
    if y_true.shape != y_pred.shape:
        raise ValueError(f"soft_dice: shapes differ, {y_true.shape} vs {y_pred.shape}")
    axes = tuple(range(1, y_true.ndim - 1))
    top = 2 * jnp.sum(y_true * y_pred, axis=axes)
    bottom = jnp.sum(y_true, axis=axes) + jnp.sum(y_pred, axis=axes)
    return jnp.mean((top + eps) / (bottom + eps))


def nmi(fixed: jax.Array, warped: jax.Array, bins: int = 32, sigma: float = 0.0, eps: float = 1e-10) -> jax.Array:
    """Negative normalised mutual information, ``-(H(A) + H(B)) / H(A, B)`` (Studholme et al. 1999), from a
    differentiable Parzen-window joint histogram: each intensity (clipped to [0, 1]) votes for ``bins``
    equally spaced centres with Gaussian weights of width ``sigma`` (default: half the bin spacing),
    normalised per voxel. Mean over the batch; channels must be 1. For multi-modal pairs."""
    if fixed.shape != warped.shape or fixed.shape[-1] != 1:
        raise ValueError(f"nmi: expected two single-channel images of one shape, got {fixed.shape} and {warped.shape}")
    centres = jnp.linspace(0.0, 1.0, bins)
    width = sigma or 0.5 / (bins - 1)

    def votes(x):
        x = jnp.clip(x.reshape(x.shape[0], -1), 0.0, 1.0)
        w = jnp.exp(-0.5 * ((x[..., None] - centres) / width) ** 2)
        return w / (jnp.sum(w, axis=-1, keepdims=True) + eps)

    wa, wb = votes(fixed), votes(warped)
    joint = jnp.einsum("bni,bnj->bij", wa, wb) / wa.shape[1]
    pa, pb = joint.sum(axis=2), joint.sum(axis=1)
    entropy = lambda p, axes: -jnp.sum(p * jnp.log(p + eps), axis=axes)  # noqa: E731
    return -jnp.mean((entropy(pa, 1) + entropy(pb, 1)) / entropy(joint, (1, 2)))


_SIX = ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))
#: MIND-SSC: the 12 pairs of six-neighbourhood offsets at distance sqrt(2) (Heinrich et al. 2013)
SSC_PAIRS = tuple((p, q) for i, p in enumerate(_SIX) for q in _SIX[i + 1 :] if sum((a - b) ** 2 for a, b in zip(p, q)) == 2)


def _shifted(x: jax.Array, offset) -> jax.Array:
    """``x(v + offset)`` with edge values outside, for ``(B, X, Y, Z, C)``."""
    pad = [(0, 0)] + [(1, 1)] * 3 + [(0, 0)]
    padded = jnp.pad(x, pad, mode="edge")
    return padded[(slice(None), *(slice(1 + o, 1 + o + n) for o, n in zip(offset, x.shape[1:4])), slice(None))]


def mind_ssc(image: jax.Array, radius: int = 1, eps: float = 1e-6) -> jax.Array:
    """MIND-SSC descriptors ``(B, X, Y, Z, 12)`` of a 3-D image (Heinrich et al., MICCAI 2013): for each of
    the 12 neighbour pairs ``(p, q)``, the patch distance ``D = box_(2r+1)((I(x+p) - I(x+q))^2)``, then
    ``exp(-D / V)`` with ``V`` the mean of ``D`` over the pairs (clipped to [1e-3, 1e3] times its mean over
    the image), divided by its maximum over the pairs. Invariant to affine intensity changes."""
    if image.ndim != 5 or image.shape[-1] != 1:
        raise ValueError(f"mind_ssc: expected a single-channel 3-D image (B, X, Y, Z, 1), got {image.shape}")
    window = 2 * radius + 1
    dist = jnp.concatenate(
        [box_sum((_shifted(image, p) - _shifted(image, q)) ** 2, window) / window**3 for p, q in SSC_PAIRS], axis=-1
    )
    var = jnp.mean(dist, axis=-1, keepdims=True)
    level = jnp.mean(var, axis=(1, 2, 3, 4), keepdims=True)
    var = jnp.clip(var, level * 1e-3, level * 1e3) + eps
    mind = jnp.exp(-dist / var)
    return mind / jnp.max(mind, axis=-1, keepdims=True)


def mind_loss(fixed: jax.Array, warped: jax.Array, radius: int = 1) -> jax.Array:
    """Mean squared difference of the MIND-SSC descriptors: a similarity for multi-modal pairs."""
    return mse(mind_ssc(fixed, radius), mind_ssc(warped, radius))


@dataclasses.dataclass(frozen=True)
class Similarity:
    """L_sim of eq. 3-7 by name (``config.loss.similarity``): ``sim(fixed, warped)`` is a scalar to minimise.
    Subclasses set ``name`` and implement :meth:`__call__`; ``window`` is ``config.loss.ncc_window`` (the
    local window of a windowed measure; others ignore it). Frozen, so instances compare and hash by value."""

    window: int = 9
    name: ClassVar[str] = "similarity"

    def __call__(self, fixed: jax.Array, warped: jax.Array) -> jax.Array:
        raise NotImplementedError


#: name -> similarity class; :func:`register_similarity` adds to it
SIMILARITIES: Dict[str, Type[Similarity]] = {}


def register_similarity(cls: Type[Similarity]) -> Type[Similarity]:
    """Makes a similarity usable from configs: ``config.loss.similarity = cls.name`` (also a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Similarity)) or cls.name == Similarity.name:
        raise TypeError(f"register_similarity takes a Similarity subclass with its own name, got {cls!r}")
    before = SIMILARITIES.get(cls.name)
    where = lambda c: f"{c.__module__}.{c.__qualname__}"  # noqa: E731 (the same class re-imported is no clash)
    if before is not None and where(before) != where(cls):
        # a fork's "ncc" would silently change NCC for every config: a new name instead
        raise ValueError(f"similarity {cls.name!r} is registered already (by {where(before)}); give {where(cls)} another name")
    SIMILARITIES[cls.name] = cls
    return cls


@register_similarity
@dataclasses.dataclass(frozen=True)
class NCC(Similarity):
    """Eq. 1: local NCC over a ``window^d`` box (:func:`ncc`), the paper's."""

    name: ClassVar[str] = "ncc"

    def __call__(self, fixed, warped):
        return ncc(fixed, warped, window=self.window)


@register_similarity
@dataclasses.dataclass(frozen=True)
class MIND(Similarity):
    """MIND-SSC descriptors' mean squared difference (:func:`mind_loss`), for multi-modal pairs."""

    name: ClassVar[str] = "mind"

    def __call__(self, fixed, warped):
        return mind_loss(fixed, warped)


@register_similarity
@dataclasses.dataclass(frozen=True)
class NMI(Similarity):
    """Negative normalised mutual information (:func:`nmi`), for multi-modal pairs."""

    name: ClassVar[str] = "nmi"

    def __call__(self, fixed, warped):
        return nmi(fixed, warped)


def similarity(name: str = "ncc", window: int = 9) -> Similarity:
    """``L_sim(fixed, warped)`` by its registered name: ``ncc`` (eq. 1, window ``window``), ``mind``
    (MIND-SSC), ``nmi``, or one a fork registered (:func:`register_similarity`)."""
    if name not in SIMILARITIES:
        raise ValueError(f"unknown similarity {name!r} (choose from {', '.join(sorted(SIMILARITIES))})")
    return SIMILARITIES[name](window=int(window))


def registration_loss(
    moving: jax.Array,
    fixed: jax.Array,
    disp: jax.Array,
    reg_weight: float = 1.0,
    window: int = 9,
    sim: Optional[Callable[[jax.Array, jax.Array], jax.Array]] = None,
) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """``L = L_sim(I_m(phi), I_f) + lambda L_reg(phi)`` (eq. 3), on the grid of ``fixed``.

    For a low-resolution model ``disp`` is already ``up(phi^L)``, which makes this eq. 5; for the teacher
    it is ``up(phi^T)``, eq. 7. ``sim``: ``L_sim(fixed, warped)`` (default: NCC over ``window^d``, eq. 1;
    see :func:`similarity`). Returns the loss and its two terms.
    """
    warped = warp(moving, disp)
    sim_value = ncc(fixed, warped, window=window) if sim is None else sim(fixed, warped)
    reg = grad_l2(disp)
    return sim_value + reg_weight * reg, {"sim": sim_value, "reg": reg}


def label_dice_loss(moving_labels: jax.Array, fixed_labels: jax.Array, disp: jax.Array, num_labels: int) -> jax.Array:
    """``1 - soft Dice`` between the moving label map warped by ``disp`` and the fixed one (VoxelMorph's
    semi-supervised term): label indices ``(B, *spatial)`` (0 background, ``1..num_labels`` structures)
    become one-hot maps, the moving one is warped linearly, background is left out of the mean."""
    k = int(num_labels)
    moving = jax.nn.one_hot(moving_labels, k + 1, dtype=disp.dtype)[..., 1:]
    fixed = jax.nn.one_hot(fixed_labels, k + 1, dtype=disp.dtype)[..., 1:]
    return 1.0 - soft_dice(fixed, warp(moving, disp))


@dataclasses.dataclass(frozen=True)
class Objective:
    """L of eq. 3 (eq. 4, 5, 7 by what ``disp`` is): ``L_sim(I_m(phi), I_f) + lambda L_reg(phi)``, plus
    ``label_weight * (1 - soft Dice)`` of the warped label maps when the batch carries them.

    ``sim``: ``L_sim(fixed, warped)`` (:func:`similarity`; ``None`` is NCC over ``window^d``)."""

    reg_weight: float = 1.0
    window: int = 9
    sim: Optional[Callable] = None
    label_weight: float = 0.0
    num_labels: int = 0

    def __call__(self, batch: Dict[str, jax.Array], disp: jax.Array) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        loss, terms = registration_loss(batch["moving"], batch["fixed"], disp, self.reg_weight, self.window, self.sim)
        if self.label_weight:
            dice = label_dice_loss(batch["moving_labels"], batch["fixed_labels"], disp, self.num_labels)
            loss = loss + self.label_weight * dice
            terms = dict(terms, dice_loss=dice)
        return loss, terms
