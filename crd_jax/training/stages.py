"""The stages of the CRD scheme, each turned into a loss function, initial parameters and frozen inputs.

Kinds (``config.stages.<name>.kind``):

* ``baseline`` (``resolution = "high" | "low"``): one backbone at one resolution, eq. 3 / eq. 5.
* ``cooperative``: S1, one backbone on both resolutions, eq. 4-6.
* ``teacher``: S2, the FST fusion head on a frozen S1 backbone (``backbone = <stage name>``), eq. 7.
* ``distill``: S3, a low-resolution student under a frozen teacher (``teacher = <stage name>``), eq. 8-10;
  ``init = <stage name>`` starts the student from that stage (the authors start from VM-L), ``""`` from scratch.

Every stage exports a model (``kind``: ``registrar`` or ``teacher``) that later stages and
``crd-jax register`` load.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional

import jax

from crd_jax.models import build as mbuild
from crd_jax.training import baseline, cooperative, distill, teacher


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


def backbone_name(arch) -> str:
    return "VM-diff" if arch["diffeomorphic"] else "VM"


def low_suffix(shift: int) -> str:
    return "L" * shift


def default_label(kind: str, st, arch, shift: int) -> str:
    name = backbone_name(arch)
    if kind == "baseline":
        return f"{name}-H" if st.resolution == "high" else f"{name}-{low_suffix(shift)}"
    if kind == "cooperative":
        return f"{name}-H (RC)"
    if kind == "teacher":
        return "FST"
    if kind == "distill":
        return f"{name}-{low_suffix(shift)}-CRD"
    return kind


def _spec(kind: str, arch, factor: int, label: str, stage: str) -> Dict[str, Any]:
    return {"kind": kind, "architecture": arch, "factor": int(factor), "label": label, "stage": stage}


def _init_or_copy(st, done: Dict[str, Trained], make_fresh: Callable[[], Any]):
    if st.get("init", ""):
        if st.init not in done:
            raise ValueError(f"stage initialises from '{st.init}', which has not run before it")
        return jax.tree_util.tree_map(lambda x: x, done[st.init].params)
    return make_fresh()


def plan_stage(name: str, st, config, done: Dict[str, Trained], key, example) -> StagePlan:
    """Everything the loop needs for stage ``name``. ``example``: a host batch for shapes."""
    arch = mbuild.architecture(config.model)
    shift = int(config.model.shift)
    n = 2**shift
    loss_cfg = config.loss
    reg, window = float(loss_cfg.reg_weight), int(loss_cfg.ncc_window)
    m, f = example["moving"][:1], example["fixed"][:1]
    kind = st.kind
    label = st.get("label", "") or default_label(kind, st, arch, shift)
    identity = lambda p: p  # noqa: E731

    if kind == "baseline":
        if st.resolution not in ("high", "low"):
            raise ValueError(f"stage {name}: resolution must be 'high' or 'low'")
        factor = 1 if st.resolution == "high" else n
        model = mbuild.registrar_from_config(arch, factor)
        init = _init_or_copy(st, done, lambda: model.init(key, m, f))
        return StagePlan(baseline.make_loss(model, reg, window), init, {}, model, identity,
                         _spec("registrar", arch, factor, label, name))

    if kind == "cooperative":
        high, low = mbuild.registrar_from_config(arch, 1), mbuild.registrar_from_config(arch, n)
        low = dataclasses.replace(low, backbone=high.backbone)
        init = _init_or_copy(st, done, lambda: high.init(key, m, f))
        return StagePlan(cooperative.make_loss(high, low, reg, window), init, {}, high, identity,
                         _spec("registrar", arch, 1, label, name))

    if kind == "teacher":
        if st.backbone not in done:
            raise ValueError(f"stage {name}: backbone stage '{st.backbone}' has not run before it")
        model = mbuild.teacher_from_config(arch, n)
        frozen = {"backbone": done[st.backbone].params}
        init = model.init_head(key, frozen["backbone"], m, f)
        return StagePlan(teacher.make_loss(model, reg, window), init, frozen, model,
                         lambda p: {"backbone": frozen["backbone"], "head": p},
                         _spec("teacher", arch, n, label, name))

    if kind == "distill":
        if st.teacher not in done:
            raise ValueError(f"stage {name}: teacher stage '{st.teacher}' has not run before it")
        t = done[st.teacher]
        student = mbuild.registrar_from_config(arch, n)
        init = _init_or_copy(st, done, lambda: student.init(key, m, f))
        loss_fn = distill.make_loss(
            student, t.model, float(loss_cfg.alpha), float(loss_cfg.beta), reg, window, str(loss_cfg.feature_target)
        )
        return StagePlan(loss_fn, init, t.params, student, identity, _spec("registrar", arch, n, label, name))

    raise ValueError(f"stage {name}: unknown kind {kind!r} (baseline, cooperative, teacher, distill)")
