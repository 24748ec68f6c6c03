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
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict

import jax

from crd_jax.models import build as mbuild
from crd_jax.models.layers import redraw_flow_heads
from crd_jax.models.teacher import ResampledTeacher
from crd_jax.training import baseline, cooperative, distill, joint, teacher


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


def stage_model_config(config, st) -> dict:
    """``config.model`` with the stage's own ``model`` block on top."""
    cfg = config.model.to_dict()
    cfg.update(st.get("model", {}).to_dict() if hasattr(st.get("model", {}), "to_dict") else dict(st.get("model", {})))
    return cfg


def backbone_name(arch) -> str:
    if arch.get("backbone") == "affine":
        return "Affine"
    name = {"voxelmorph": "VM", "pyramid": "Pyd"}[arch.get("backbone", "voxelmorph")]
    name = f"{name}-diff" if arch["diffeomorphic"] else name
    if int(arch.get("cascade", 1)) > 1:
        name = f"{arch['cascade']}-cascade {name}"
    return name


def low_suffix(shift: int) -> str:
    return "L" * shift


def default_label(kind: str, st, arch, shift: int) -> str:
    name = backbone_name(arch)
    resolution = st.get("resolution", "low" if kind == "distill" else "high")
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
    if st.get("init", ""):
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


def plan_stage(name: str, st, config, done: Dict[str, Trained], key, example) -> StagePlan:
    """Everything the loop needs for stage ``name``. ``example``: a host batch for shapes."""
    model_cfg = stage_model_config(config, st)
    arch = mbuild.architecture(model_cfg)
    shift = int(model_cfg.get("shift", 1))
    n = 2**shift
    loss_cfg = config.loss
    reg, window = float(loss_cfg.reg_weight), int(loss_cfg.ncc_window)
    m, f = example["moving"][:1], example["fixed"][:1]
    kind = st.kind
    flow_init = str(model_cfg.get("flow_init", "torch"))
    label = st.get("label", "") or default_label(kind, st, arch, shift)
    identity = lambda p: p  # noqa: E731
    resolution = st.get("resolution", "low" if kind in ("distill", "joint_all") else "high")
    if resolution not in ("high", "low"):
        raise ValueError(f"stage {name}: resolution must be 'high' or 'low'")
    factor = 1 if resolution == "high" else n

    if kind == "baseline":
        model = mbuild.registrar_from_config(arch, factor)
        weight = 0.0 if arch.get("backbone") == "affine" else reg  # an affine map needs no smoothness term
        init = _init_or_copy(st, done, lambda: model.init(key, m, f), key, flow_init)
        plan = StagePlan(baseline.make_loss(model, weight, window), init, {}, model, identity,
                         _spec("registrar", arch, factor, label, name))

    elif kind == "cooperative":
        high, low = mbuild.registrar_from_config(arch, 1), mbuild.registrar_from_config(arch, n)
        low = dataclasses.replace(low, backbone=high.backbone)
        init = _init_or_copy(st, done, lambda: high.init(key, m, f), key, flow_init)
        plan = StagePlan(cooperative.make_loss(high, low, reg, window), init, {}, high, identity,
                         _spec("registrar", arch, 1, label, name))

    elif kind == "teacher":
        source = _require(done, st.backbone, "backbone", name)
        t_arch = dict(source.spec["architecture"], fusion=arch["fusion"], teacher_align_corners=arch["teacher_align_corners"])
        model = mbuild.teacher_from_config(t_arch, n)
        frozen = {"backbone": source.params}
        init = redraw_flow_heads(model.init_head(key, frozen["backbone"], m, f), jax.random.fold_in(key, 1), flow_init)
        return StagePlan(teacher.make_loss(model, reg, window), init, frozen, model,
                         lambda p: {"backbone": frozen["backbone"], "head": p},
                         _spec("teacher", t_arch, n, label, name))

    elif kind == "distill":
        t = _require(done, st.teacher, "teacher", name)
        student = mbuild.registrar_from_config(arch, factor)
        teacher_model = t.model
        if t.spec["kind"] == "registrar":
            teacher_model = ResampledTeacher(t.model, factor, st.get("teacher_features", "none"))
        init = _init_or_copy(st, done, lambda: student.init(key, m, f), key, flow_init)
        loss_fn = distill.make_loss(student, teacher_model, float(loss_cfg.alpha), float(loss_cfg.beta), reg, window,
                                    str(loss_cfg.feature_target), str(loss_cfg.get("deformation_grid", "student")))
        plan = StagePlan(loss_fn, init, t.params, student, identity, _spec("registrar", arch, factor, label, name))

    elif kind in ("joint_teacher", "joint_all"):
        model = mbuild.teacher_from_config(arch, n)
        high = mbuild.registrar_from_config(arch, 1)
        low = dataclasses.replace(mbuild.registrar_from_config(arch, n), backbone=high.backbone)
        k1, k2, k3 = jax.random.split(key, 3)
        backbone_params = high.init(k1, m, f)
        params = redraw_flow_heads({"backbone": backbone_params, "head": model.init_head(k2, backbone_params, m, f)},
                                   jax.random.fold_in(key, 1), flow_init)
        if kind == "joint_teacher":
            return StagePlan(joint.make_teacher_loss(high, low, model, reg, window), params, {}, model, identity,
                             _spec("teacher", arch, n, label, name))
        student = mbuild.registrar_from_config(arch, factor)
        params["student"] = redraw_flow_heads(student.init(k3, m, f), jax.random.fold_in(key, 2), flow_init)
        loss_fn = joint.make_all_loss(high, low, model, student, float(loss_cfg.alpha), float(loss_cfg.beta), reg, window,
                                      str(loss_cfg.feature_target))
        return StagePlan(loss_fn, params, {}, student, lambda p: p["student"], _spec("registrar", arch, factor, label, name))

    else:
        raise ValueError(
            f"stage {name}: unknown kind {kind!r} (baseline, cooperative, teacher, distill, joint_teacher, joint_all)"
        )

    if arch.get("affine") == "stage":
        source = _require(done, model_cfg.get("affine_stage", ""), "affine", name)
        plan = _freeze_pretrained_affine(plan, source.params)
    return plan
