"""Stage S3, cross-resolution distillation (Section III-C): the low-resolution student under the teacher.

``L_distillation = L^L + alpha * L_deformation + beta * L_feature`` (eq. 10), a sum of :class:`DistillTerm`
objects (a new term is one registered class and one line of ``config.loss.terms``), with
``L_deformation = MSE(phi^T, phi^S)`` (eq. 8, both on the student's grid; for pyramids the sum over the
intermediate fields, eq. 11) and
``L_feature = sum_l MSE(F^T_l, F^S_l)`` (eq. 9) over the teacher's levels (F_0..F_3 for k = 1).
The teacher's parameters are a frozen argument; its outputs are constants for the student.

``feature_target``: ``raw`` compares the features themselves (the paper, after FitNets); ``attention``
compares attention maps ``sum_c F^2`` (the authors' released code, after Zagoruyko and Komodakis).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar, Dict, Mapping, Optional, Sequence, Tuple, Type, Union

import jax
import jax.numpy as jnp
import numpy as np

from crd_jax import losses
from crd_jax.models.output import ModelOutput
from crd_jax.ops.grad_l2 import field_mse, mse_on_coarse_grid
from crd_jax.ops.spatial import upsample_field, upsampled_from
from crd_jax.models.registrar import Registrar
from crd_jax.losses import Objective
from crd_jax.typing import Model, Params

if TYPE_CHECKING:
    import ml_collections

OutputLike = Union[ModelOutput, Mapping[str, Any]]  # a model output, or a mapping with its keys


def attention_map(feature: jax.Array) -> jax.Array:
    """``sum_c F^2``, keeping a channel axis of one."""
    return jnp.sum(feature * feature, axis=-1, keepdims=True)


def feature_loss(
    teacher_features: Mapping[int, jax.Array], student_features: Mapping[int, jax.Array], target: str = "raw"
) -> Union[jax.Array, float]:
    """Eq. 9 over the levels the teacher provides."""
    if target not in ("raw", "attention"):
        raise ValueError(f"feature_target must be 'raw' or 'attention', got {target!r}")
    total = 0.0
    for level, ft in teacher_features.items():
        fs = student_features[level]
        if target == "raw" and ft.shape != fs.shape:
            raise ValueError(
                f"level {level}: teacher features {ft.shape} and student features {fs.shape} differ; "
                "distil attention maps (loss.feature_target='attention') or set loss.beta=0"
            )
        if target == "attention":
            ft, fs = attention_map(ft), attention_map(fs)
        total = total + losses.mse(ft, fs)
    return total


DEFORMATION_GRIDS = ("student", "full")


def deformation_loss(teacher_out: OutputLike, student_out: OutputLike, grid: str = "student") -> jax.Array:
    """Eq. 8, ``MSE(phi^T, phi^S)``; for pyramids eq. 11, the sum over the levels of the intermediate fields
    that teacher and student share.

    ``grid = "student"``: both fields on the student's grid, in its voxels. ``grid = "full"``: ``up(phi^T)``
    against ``up(phi^S)`` at the high resolution, in high-resolution voxels (the authors' code); a field
    ``n`` times larger in voxels makes this term ``n^2`` times heavier at the same ``alpha``.
    """
    if grid not in DEFORMATION_GRIDS:
        raise ValueError(f"deformation grid must be one of {DEFORMATION_GRIDS}, got {grid!r}")
    t, s = as_output_like(teacher_out), as_output_like(student_out)
    if t.fields is not None and s.fields is not None:
        return sum(losses.mse(t.fields[l], s.fields[l]) for l in t.fields)
    if grid == "full":  # on the coarse grid where both are upsampled (crd_jax.ops.grad_l2.mse_of_upsampled)
        return field_mse(t.disp, s.disp)
    return losses.mse(t.disp_low, s.disp_low)


def without_upsampled_disp(out: OutputLike, enabled: Optional[bool] = None) -> Tuple[OutputLike, int]:
    """``(out without disp, factor)`` where ``out.disp`` is ``upsample_field(out.disp_low, factor)`` (the FST's
    "half" output, ``up(phi^T)``: a function of ``disp_low``, eight times its size at n = 2), else ``(out, 0)``.
    :func:`with_upsampled_disp` puts it back as an ``upsample_field`` result again, which eq. 8 on the full grid
    recognises (:func:`crd_jax.ops.grad_l2.field_mse`): the teacher cache stores and moves the coarse field only,
    and ``stop_gradient`` does not hide what the full field is. Where eq. 8 would not take the coarse grid
    (:func:`crd_jax.ops.grad_l2.mse_on_coarse_grid`; ``enabled``: that decision made by the caller) ``out`` is kept
    whole: eq. 8 would form the full field anyway."""
    enabled = mse_on_coarse_grid() if enabled is None else enabled
    if not enabled or not isinstance(out, ModelOutput) or out.disp is None or out.disp_low is None:
        return out, 0
    source = upsampled_from(out.disp)
    if source is None or source[0] is not out.disp_low:
        return out, 0
    return out.replace(disp=None), source[1]


def with_upsampled_disp(out: OutputLike, factor: int) -> OutputLike:
    """Inverse of :func:`without_upsampled_disp`: ``disp = upsample_field(disp_low, factor)`` (``factor`` 0: as is)."""
    return out.replace(disp=upsample_field(out.disp_low, factor)) if factor else out


def as_output_like(out: OutputLike) -> ModelOutput:
    """Model outputs, or mappings with their keys (tests and forks build those by hand)."""
    if isinstance(out, ModelOutput):
        return out
    return ModelOutput(
        disp=out.get("disp"), disp_low=out.get("disp_low"), fields=out.get("fields"), features=out.get("features", {})
    )


@dataclasses.dataclass(frozen=True)
class DistillTerm:
    """One weighted term of eq. 10: ``weight * value(teacher_out, student_out)``. Subclasses set ``name``
    (the key in ``aux`` and in ``config.loss.terms``) and implement :meth:`value`."""

    weight: float
    name: ClassVar[str] = "term"

    def value(self, teacher_out: OutputLike, student_out: OutputLike) -> jax.Array:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Deformation(DistillTerm):
    """``alpha * L_deformation``, eq. 8 (eq. 11 for pyramids)."""

    grid: str = "student"
    name: ClassVar[str] = "deformation"

    def value(self, t: OutputLike, s: OutputLike) -> jax.Array:
        return deformation_loss(t, s, self.grid)


@dataclasses.dataclass(frozen=True)
class Feature(DistillTerm):
    """``beta * L_feature``, eq. 9."""

    target: str = "raw"
    name: ClassVar[str] = "feature"

    def value(self, t: OutputLike, s: OutputLike) -> Union[jax.Array, float]:
        return feature_loss(as_output_like(t).features, as_output_like(s).features, self.target)


TERMS: Dict[str, Type[DistillTerm]] = {}


def register_term(cls: Type[DistillTerm]) -> Type[DistillTerm]:
    """Makes a term usable from configs: ``config.loss.terms.<cls.name> = {"weight": w, ...}``."""
    TERMS[cls.name] = cls
    return cls


register_term(Deformation)
register_term(Feature)


def terms_from_config(loss_cfg: ml_collections.ConfigDict) -> Tuple[DistillTerm, ...]:
    """Eq. 10's terms: deformation (``alpha``, ``deformation_grid``), feature (``beta``, ``feature_target``),
    then every entry of ``loss.terms`` (``{name: {"weight": w, **fields}}``, a registered term each)."""
    terms = [
        Deformation(float(loss_cfg.alpha), str(loss_cfg.get("deformation_grid", "student"))),
        Feature(float(loss_cfg.beta), str(loss_cfg.get("feature_target", "raw"))),
    ]
    extra = loss_cfg.get("terms", {}) or {}
    extra = extra.to_dict() if hasattr(extra, "to_dict") else dict(extra)
    for name, fields in extra.items():
        if name not in TERMS:
            raise ValueError(f"loss.terms: unknown distillation term {name!r} (registered: {', '.join(sorted(TERMS))})")
        terms.append(TERMS[name](**dict(fields)))
    return tuple(terms)


def distillation_loss(
    t: OutputLike,
    s: OutputLike,
    batch: Mapping[str, jax.Array],
    terms: Sequence[DistillTerm],
    objective: Objective = Objective(),
    student_term: bool = True,
) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """Eq. 10 for a student output ``s`` given (constant) teacher output ``t``: ``L^L`` plus every weighted
    term (terms of weight 0 are not computed). ``student_term = False`` leaves ``L^L`` out of the total (the
    authors' ``train.py`` trains S3 on the distillation terms alone); it is still reported in ``aux``."""
    loss_l, parts = objective(batch, as_output_like(s).disp)
    total = loss_l if student_term else 0.0  # aux values never enter the gradient (has_aux)
    aux = {"loss_L": loss_l, "sim": parts["sim"]}
    for term in terms:
        value = term.value(t, s) if term.weight else 0.0
        aux[term.name] = value
        total = total + term.weight * value
    return total, aux


def init_regressor(
    key: jax.Array,
    student_features: Mapping[int, Union[jax.Array, jax.ShapeDtypeStruct]],
    teacher_features: Mapping[int, Union[jax.Array, jax.ShapeDtypeStruct]],
) -> Dict[str, Dict[str, jax.Array]]:
    """FitNets regressors (Romero et al. 2015): per shared level, a 1x1 conv ``C_s -> C_t`` (PyTorch's default
    uniform draw) and a zero bias. Arguments: feature dicts or their shapes."""
    out = {}
    for i, level in enumerate(sorted(set(student_features) & set(teacher_features))):
        cs, ct = student_features[level].shape[-1], teacher_features[level].shape[-1]
        bound = 1.0 / float(np.sqrt(cs))
        out[str(level)] = {
            "kernel": jax.random.uniform(jax.random.fold_in(key, i), (cs, ct), jnp.float32, -bound, bound),
            "bias": jnp.zeros((ct,), jnp.float32),
        }
    return out


def regress(regressor: Mapping[str, Mapping[str, jax.Array]], features: Mapping[int, jax.Array]) -> Dict[int, jax.Array]:
    """The student's features mapped to the teacher's channels (levels without a regressor pass unchanged)."""
    return {
        l: (f @ regressor[str(l)]["kernel"] + regressor[str(l)]["bias"]) if str(l) in regressor else f
        for l, f in features.items()
    }


@dataclasses.dataclass(frozen=True)
class DistillLoss:
    """S3's ``loss_fn(params, frozen, batch) -> (loss, aux)`` (eq. 10) for a student under a frozen teacher.

    ``teacher``: an object with ``apply(frozen, moving, fixed)`` returning ``disp_low`` and ``features``
    on the student's grid (the FST, :class:`crd_jax.models.teacher.Teacher`). ``with_regressor``: the
    trainable parameters are ``{"student", "regressor"}`` (:func:`init_regressor`). ``student_term``: whether
    ``L^L`` is part of the total (``loss.student_term``). ``teacher_tree``: set by :meth:`with_cached_teacher`;
    the teacher's outputs then come with the batch (``batch["teacher/<i>"]``, the leaves of its output for
    each pair, :mod:`crd_jax.training.teacher_cache`) instead of being recomputed at every step;
    ``teacher_disp_factor``: the cached output has no ``disp`` (:func:`without_upsampled_disp`), it is
    ``upsample_field(disp_low, teacher_disp_factor)``.
    """

    student: Registrar
    teacher: object
    terms: Tuple[DistillTerm, ...]
    objective: Objective = Objective()
    with_regressor: bool = False
    student_term: bool = True
    teacher_tree: object = None
    teacher_disp_factor: int = 0

    def teacher_output(self, frozen: Params, batch: Mapping[str, jax.Array]) -> ModelOutput:
        """phi^T and F^T for the batch: constants for the student (``stop_gradient``)."""
        if self.teacher_tree is not None:
            leaves = [batch[cached_key(i)] for i in range(self.teacher_tree.num_leaves)]
            return with_upsampled_disp(jax.tree_util.tree_unflatten(self.teacher_tree, leaves), self.teacher_disp_factor)
        from crd_jax.ops.conv import bf16_training

        # float32 under train.bf16 too: the targets must not depend on whether the teacher cache (filled outside
        # the step, in float32) is on, which may change between resumes
        with bf16_training(False):
            out, factor = without_upsampled_disp(self.teacher.apply(frozen, batch["moving"], batch["fixed"]))
        return with_upsampled_disp(jax.lax.stop_gradient(out), factor)

    def with_cached_teacher(self, teacher_tree: jax.tree_util.PyTreeDef, disp_factor: int = 0) -> "DistillLoss":
        """The same loss reading the teacher's outputs (structure ``teacher_tree``) from the batch; ``disp_factor``:
        they leave out ``disp``, ``upsample_field(disp_low, disp_factor)`` (:func:`without_upsampled_disp`)."""
        return dataclasses.replace(self, teacher_tree=teacher_tree, teacher_disp_factor=int(disp_factor))

    def __call__(self, params, frozen, batch):
        m, f = batch["moving"], batch["fixed"]
        t = self.teacher_output(frozen, batch)
        if self.with_regressor:
            s = self.student.apply(params["student"], m, f)
            s = s.replace(features=regress(params["regressor"], s.features))
        else:
            s = self.student.apply(params, m, f)
        return distillation_loss(t, s, batch, self.terms, self.objective, self.student_term)


def cached_key(i: int) -> str:
    """The batch key of leaf ``i`` of a cached teacher output."""
    return f"teacher/{i}"


def make_loss(
    student: Registrar,
    teacher: Model,
    terms: Sequence[DistillTerm],
    objective: Objective = Objective(),
    with_regressor: bool = False,
    student_term: bool = True,
) -> DistillLoss:
    """Eq. 10's loss for ``student`` under ``teacher`` (:class:`DistillLoss`)."""
    return DistillLoss(student, teacher, tuple(terms), objective, with_regressor, student_term)
