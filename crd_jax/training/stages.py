"""The stages of the CRD scheme (and of the paper's ablations), each turned into a loss function, initial
parameters and frozen inputs.

Kinds (``config.stages.<name>.kind``):

* ``baseline`` (``resolution = "high" | "low"``): one model at one resolution, eq. 3 / eq. 5. With a stage
  ``model`` of ``backbone = "affine"`` it trains the affine pre-alignment network alone.
* ``cooperative``: S1, one backbone on both resolutions, eq. 4-6.
* ``teacher``: S2, the FST fusion head on a frozen backbone (``backbone = <stage>``), eq. 7. The backbone is
  S1 in the paper; a plain VM-H gives the ablation teacher E (FS + FF without RC).
* ``distill``: S3, a student under a frozen teacher (``teacher = <stage>``), eq. 8-10 (eq. 11 for pyramids).
  The teacher is an FST, or any registrar (teachers A-D of Table VI/VII, Hinton- and Yu-style distillation
  of light models): its field is resampled onto the student's grid, its features too when
  ``teacher_features = "downsample"`` (teacher A-feature-down). ``init = <stage>`` starts the student from a
  finished stage (the authors start from VM-L), ``""`` from scratch; ``resolution`` is the student's.
* ``joint_teacher``: S1 and S2 trained together (teacher G of Table VIII).
* ``joint_all``: S1, S2 and S3 trained together (teacher F); the stage exports the student.

A stage may override the global model with its own ``model`` block (VM-large for teacher B, a 2-cascade for
teacher C, light channels for the students of Table III). Every stage exports a model (``registrar`` or
``teacher``) that later stages and ``crd-jax register`` load.

A kind's typed config and its planner are one class (:mod:`crd_jax.training.stage_kinds`); the built-in
kinds' ``plan`` calls the ``plan_<kind>`` function of this module.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, Union

import jax

from crd_jax import losses
from crd_jax.models import backbones
from crd_jax.models import build as mbuild
from crd_jax.models.layers import redraw_flow_heads
from crd_jax.models.teacher import ResampledTeacher
from crd_jax.training import baseline, cooperative, distill, joint, stage_kinds, teacher

if TYPE_CHECKING:
    import ml_collections
    import numpy as np

    StageBlock = Union[stage_kinds.StageConfig, ml_collections.ConfigDict, Mapping[str, Any]]  # typed or raw


@dataclasses.dataclass
class Trained:
    """A finished stage: the model object, its full parameters (as ``model.apply`` takes them), its spec."""

    model: Any
    params: Any
    spec: Dict[str, Any]


@dataclasses.dataclass
class StagePlan:
    loss_fn: Callable
    init_params: Any
    frozen: Any
    model: Any  # what the stage's result is used as (registrar or teacher)
    full_params: Callable[[Any], Any]  # trained params -> params for ``model.apply``
    spec: Dict[str, Any]


def stage_model_config(config: ml_collections.ConfigDict, st: StageBlock) -> dict:
    """``config.model`` with the stage's own ``model`` block on top (``st``: a typed stage or a raw block)."""
    cfg = config.model.to_dict()
    own = st.model if isinstance(st, stage_kinds.StageConfig) else st.get("model", {})
    cfg.update(own.to_dict() if hasattr(own, "to_dict") else dict(own))
    return cfg


def stage_loss_config(config: ml_collections.ConfigDict, st: StageBlock) -> ml_collections.ConfigDict:
    """``config.loss`` with the stage's own ``loss`` block on top (a ConfigDict; unknown fields refused)."""
    import ml_collections

    cfg = config.loss.to_dict()
    own = st.loss if isinstance(st, stage_kinds.StageConfig) else st.get("loss", {})
    own = own.to_dict() if hasattr(own, "to_dict") else dict(own)
    for key in own:
        if key not in cfg:
            raise ValueError(f"stage loss override: config.loss has no field {key!r}")
    cfg.update(own)
    return ml_collections.ConfigDict(cfg)


def backbone_name(arch: Mapping[str, Any]) -> str:
    name = backbones.entry(arch).label
    if arch.get("backbone") == "affine":
        return name
    name = f"{name}-diff" if arch["diffeomorphic"] else name
    if int(arch.get("cascade", 1)) > 1:
        name = f"{arch['cascade']}-cascade {name}"
    return name


def low_suffix(shift: int) -> str:
    return "L" * shift


def default_label(kind: str, st: stage_kinds.StageConfig, arch: Mapping[str, Any], shift: int) -> str:
    name = backbone_name(arch)
    resolution = getattr(st, "resolution", st.default_resolution)
    suffix = "H" if resolution == "high" else low_suffix(shift)
    if kind == "baseline":
        return f"{name}-{suffix}"
    if kind == "cooperative":
        return f"{name}-H (RC)"
    if kind in ("teacher", "joint_teacher"):
        return "FST" if kind == "teacher" else "FST (S1+S2 joint)"
    if kind == "distill":
        return f"{name}-{suffix}-CRD"
    if kind == "joint_all":
        return f"{name}-{suffix} (S1+S2+S3 joint)"
    return kind


def _spec(kind: str, arch, factor: int, label: str, stage: str) -> Dict[str, Any]:
    return {"kind": kind, "architecture": arch, "factor": int(factor), "label": label, "stage": stage}


def _copy(tree):
    return jax.tree_util.tree_map(lambda x: x, tree)


def _init_or_copy(st, done: Dict[str, Trained], make_fresh: Callable[[], Any], key, flow_init: str):
    """The stage's starting parameters: a finished stage's (``init``), or a fresh draw whose flow heads
    follow ``model.flow_init``."""
    if getattr(st, "init", ""):
        if st.init not in done:
            raise ValueError(f"stage initialises from '{st.init}', which has not run before it")
        return _copy(done[st.init].params)
    return redraw_flow_heads(make_fresh(), jax.random.fold_in(key, 1), flow_init)


def _require(done, name, role, stage):
    if name not in done:
        raise ValueError(f"stage {stage}: {role} stage '{name}' has not run before it")
    return done[name]


def _freeze_pretrained_affine(plan: StagePlan, affine_params) -> StagePlan:
    """``affine = "stage"``: the affine network's parameters become a frozen input; only the deformable part
    trains (freezing is structural: the affine parameters are not in the differentiated argument)."""
    inner = plan.loss_fn

    def loss_fn(params, frozen, batch):
        return inner({"affine": frozen["affine"], "deformable": params}, frozen["rest"], batch)

    full = plan.full_params
    return StagePlan(
        loss_fn,
        plan.init_params["deformable"],
        {"affine": affine_params, "rest": plan.frozen},
        plan.model,
        lambda p: full({"affine": affine_params, "deformable": p}),
        plan.spec,
    )


@dataclasses.dataclass(frozen=True)
class StageContext:
    """What every planner receives: the typed stage, its resolved architecture and loss settings."""

    name: str
    st: stage_kinds.StageConfig
    config: Any
    done: Dict[str, Trained]
    key: Any
    moving: Any
    fixed: Any
    arch: Dict[str, Any]
    shift: int
    factor: int
    label: str
    flow_init: str
    num_labels: int = 0  # structures in the label maps the batches carry (the label-supervised term)

    @property
    def n(self) -> int:
        return 2**self.shift

    @property
    def loss(self) -> ml_collections.ConfigDict:
        """``config.loss`` with this stage's ``loss`` overrides."""
        return stage_loss_config(self.config, self.st)

    @property
    def reg(self) -> float:
        return float(self.loss.reg_weight)

    @property
    def window(self) -> int:
        return int(self.loss.ncc_window)

    @property
    def sim(self) -> Callable[[jax.Array, jax.Array], jax.Array]:
        """L_sim of eq. 3-7 from ``loss.similarity`` (``ncc``, the paper's; ``mind`` or ``nmi`` for multi-modal)."""
        return losses.similarity(str(self.loss.get("similarity", "ncc")), self.window)

    @property
    def objective(self) -> losses.Objective:
        """Eq. 3's terms for every registration loss of the stage (plus ``loss.label_weight`` soft Dice)."""
        weight = float(self.loss.get("label_weight", 0.0))
        if weight and not self.num_labels:
            raise ValueError(f"stage {self.name}: loss.label_weight needs training subjects with label maps")
        return losses.Objective(self.reg, self.window, self.sim, weight, self.num_labels)

    def spec(self, kind: str, arch: Optional[Mapping[str, Any]] = None, factor: Optional[int] = None) -> Dict[str, Any]:
        return _spec(kind, arch or self.arch, self.factor if factor is None else factor, self.label, self.name)


def plan_baseline(c: StageContext) -> StagePlan:
    model = mbuild.registrar_from_config(c.arch, c.factor)
    objective = c.objective
    if c.arch.get("backbone") == "affine":
        objective = dataclasses.replace(objective, reg_weight=0.0)  # an affine map needs no smoothness term
    init = _init_or_copy(c.st, c.done, lambda: model.init(c.key, c.moving, c.fixed), c.key, c.flow_init)
    return StagePlan(baseline.make_loss(model, objective), init, {}, model, _identity, c.spec("registrar"))


def plan_cooperative(c: StageContext) -> StagePlan:
    high, low = mbuild.registrar_from_config(c.arch, 1), mbuild.registrar_from_config(c.arch, c.n)
    low = dataclasses.replace(low, backbone=high.backbone)
    init = _init_or_copy(c.st, c.done, lambda: high.init(c.key, c.moving, c.fixed), c.key, c.flow_init)
    return StagePlan(cooperative.make_loss(high, low, c.objective), init, {}, high, _identity, c.spec("registrar", factor=1))


def plan_teacher(c: StageContext) -> StagePlan:
    source = _require(c.done, c.st.backbone, "backbone", c.name)
    t_arch = dict(
        source.spec["architecture"],
        fusion=c.arch["fusion"],
        teacher_align_corners=c.arch["teacher_align_corners"],
        teacher_output=c.arch["teacher_output"],
    )
    model = mbuild.teacher_from_config(t_arch, c.n)
    frozen = {"backbone": source.params}
    init = redraw_flow_heads(
        model.init_head(c.key, frozen["backbone"], c.moving, c.fixed), jax.random.fold_in(c.key, 1), c.flow_init
    )
    return StagePlan(
        teacher.make_loss(model, c.objective),
        init,
        frozen,
        model,
        lambda p: {"backbone": frozen["backbone"], "head": p},
        c.spec("teacher", t_arch, c.n),
    )


def plan_distill(c: StageContext) -> StagePlan:
    t = _require(c.done, c.st.teacher, "teacher", c.name)
    student = mbuild.registrar_from_config(c.arch, c.factor)
    teacher_model = t.model
    if t.spec["kind"] == "registrar":
        teacher_model = ResampledTeacher(t.model, c.factor, c.st.teacher_features)
    init = _init_or_copy(c.st, c.done, lambda: student.init(c.key, c.moving, c.fixed), c.key, c.flow_init)
    terms = distill.terms_from_config(c.loss)
    student_term = bool(c.loss.get("student_term", True))
    if not c.st.feature_regressor:
        loss_fn = distill.make_loss(student, teacher_model, terms, c.objective, student_term=student_term)
        return StagePlan(loss_fn, init, t.params, student, _identity, c.spec("registrar"))
    # the stage's own trainable parameters beside the student's: exported models hold the student only
    t_out = jax.eval_shape(teacher_model.apply, t.params, c.moving, c.fixed)
    s_out = jax.eval_shape(student.apply, init, c.moving, c.fixed)
    regressor = distill.init_regressor(jax.random.fold_in(c.key, 7), s_out.features, t_out.features)
    loss_fn = distill.make_loss(student, teacher_model, terms, c.objective, with_regressor=True, student_term=student_term)
    return StagePlan(
        loss_fn, {"student": init, "regressor": regressor}, t.params, student, lambda p: p["student"], c.spec("registrar")
    )


def _joint_parts(c: StageContext):
    model = mbuild.teacher_from_config(c.arch, c.n)
    high = mbuild.registrar_from_config(c.arch, 1)
    low = dataclasses.replace(mbuild.registrar_from_config(c.arch, c.n), backbone=high.backbone)
    k1, k2, k3 = jax.random.split(c.key, 3)
    backbone_params = high.init(k1, c.moving, c.fixed)
    params = redraw_flow_heads(
        {"backbone": backbone_params, "head": model.init_head(k2, backbone_params, c.moving, c.fixed)},
        jax.random.fold_in(c.key, 1),
        c.flow_init,
    )
    return model, high, low, params, k3


def plan_joint_teacher(c: StageContext) -> StagePlan:
    model, high, low, params, _ = _joint_parts(c)
    return StagePlan(
        joint.make_teacher_loss(high, low, model, c.objective), params, {}, model, _identity, c.spec("teacher", factor=c.n)
    )


def plan_joint_all(c: StageContext) -> StagePlan:
    model, high, low, params, k3 = _joint_parts(c)
    student = mbuild.registrar_from_config(c.arch, c.factor)
    params["student"] = redraw_flow_heads(student.init(k3, c.moving, c.fixed), jax.random.fold_in(c.key, 2), c.flow_init)
    loss_fn = joint.make_all_loss(high, low, model, student, distill.terms_from_config(c.loss), c.objective)
    return StagePlan(loss_fn, params, {}, student, lambda p: p["student"], c.spec("registrar"))


def _identity(p):
    return p


def plan_stage(
    name: str,
    st: StageBlock,
    config: ml_collections.ConfigDict,
    done: Dict[str, Trained],
    key: jax.Array,
    example: Mapping[str, np.ndarray],
    num_labels: int = 0,
) -> StagePlan:
    """Everything the loop needs for stage ``name``. ``st``: the stage's block (or its typed config);
    ``example``: a host batch for shapes; ``num_labels``: structures of the training label maps. The shared wrappers apply to every kind: the resolution (from the
    kind's default) and, with ``model.affine = "stage"``, the frozen pre-trained affine network."""
    if not isinstance(st, stage_kinds.StageConfig):
        st = stage_kinds.parse_stage(name, st)
    model_cfg = stage_model_config(config, st)
    arch = mbuild.architecture(model_cfg)
    shift = int(model_cfg.get("shift", 1))
    resolution = getattr(st, "resolution", st.default_resolution)
    factor = 1 if resolution == "high" else 2**shift
    context = StageContext(
        name,
        st,
        config,
        done,
        key,
        example["moving"][:1],
        example["fixed"][:1],
        arch,
        shift,
        factor,
        st.label or default_label(st.kind, st, arch, shift),
        str(model_cfg.get("flow_init", "torch")),
        int(num_labels),
    )
    plan = st.plan(context)  # the kind's planner (``StageConfig.plan``)
    if arch.get("affine") == "stage" and st.frozen_affine != "inherited":
        if st.frozen_affine == "unsupported":
            raise ValueError(
                f"stage {name}: a '{st.kind}' stage cannot train behind a frozen affine stage "
                "(model.affine = 'stage'); use 'joint' or 'none'"
            )
        source = _require(done, model_cfg.get("affine_stage", ""), "affine", name)
        plan = _freeze_pretrained_affine(plan, source.params)
    return plan
