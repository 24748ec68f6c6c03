"""The kinds of training stage, each a typed config, checked when a config is loaded.

A stage block of ``config.stages`` is read into the dataclass of its ``kind``; a field the kind does not
have (``teachr``), a missing required field, a value out of range, or a reference to a stage that does
not run earlier is a one-line :class:`InputError` naming the field and, for a misspelling, the closest valid
name. Nothing is read with a silent default.

A kind is one class: a frozen dataclass deriving from :class:`StageConfig` with its fields and its
:meth:`StageConfig.plan` (the planner: loss, initial and frozen parameters, export), registered once with
:func:`register_kind`. The built-in kinds' planners live in :mod:`crd_jax.training.stages`.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, Tuple, Type, Union

from crd_jax.errors import InputError

if TYPE_CHECKING:  # stages imports this module
    import ml_collections

    from crd_jax.training.stages import StageContext, StagePlan

RESOLUTIONS = ("high", "low")


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Fields every kind has. ``model`` / ``loss``: overrides of the global model / loss for this stage only
    (the arms of an experiment that differ in eq. 10's weights share one config)."""

    kind: str
    steps: int
    evaluate: bool = True
    label: str = ""
    model: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    loss: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 0  # added to config.seed for this stage's training pairs and augmentation (replicate runs)
    augment: str = ""  # "" follows config.data.augment.kind; "none" or "bspline" for this stage only

    #: False for kinds whose result is loaded rather than trained (``pretrained``)
    trains: bool = dataclasses.field(default=True, init=False, repr=False)
    #: stages this one reads (their names are fields of the kind): checked to run earlier
    references: Tuple[str, ...] = dataclasses.field(default=(), init=False, repr=False)
    #: behind a pre-trained, frozen affine stage (``model.affine = "stage"``): "wrap" (the affine parameters
    #: become a frozen input), "inherited" (the frozen backbone the kind reads carries them already) or
    #: "unsupported" (an error, never a silent skip)
    frozen_affine: str = dataclasses.field(default="wrap", init=False, repr=False)
    default_resolution: str = dataclasses.field(default="high", init=False, repr=False)
    #: fields a block of this kind must set (non-empty), e.g. the stage it reads
    required: Tuple[str, ...] = dataclasses.field(default=(), init=False, repr=False)

    def plan(self, context: "StageContext") -> "StagePlan":
        """The planner: what the loop trains for this stage (``crd_jax.training.stages.StagePlan``: the pure
        loss, the initial trainable and the frozen parameters, the exported model and its spec), from the
        ``StageContext`` (this config, the resolved architecture, the loss settings, finished stages)."""
        raise NotImplementedError(f"stage kind {self.kind!r} has no planner")


def _builtin_planner(function: str) -> Callable:
    """``plan`` of a built-in kind: ``crd_jax.training.stages.<function>`` (imported when a stage is planned,
    since stages imports this module, and configs are parsed without loading the models)."""

    def plan(self, context):
        from crd_jax.training import stages

        return getattr(stages, function)(context)

    plan.__doc__ = f"The planner of this kind: :func:`crd_jax.training.stages.{function}`."
    return plan


@dataclasses.dataclass(frozen=True)
class Baseline(StageConfig):
    """One model at one resolution, eq. 3 (high) / eq. 5 (low)."""

    resolution: str = "high"
    init: str = ""
    references: Tuple[str, ...] = dataclasses.field(default=("init",), init=False, repr=False)
    plan = _builtin_planner("plan_baseline")


@dataclasses.dataclass(frozen=True)
class Cooperative(StageConfig):
    """S1: one backbone on both resolutions, eq. 4-6."""

    init: str = ""
    references: Tuple[str, ...] = dataclasses.field(default=("init",), init=False, repr=False)
    plan = _builtin_planner("plan_cooperative")


@dataclasses.dataclass(frozen=True)
class Teacher(StageConfig):
    """S2: the FST head on the frozen backbone of stage ``backbone``, eq. 7."""

    backbone: str = ""
    references: Tuple[str, ...] = dataclasses.field(default=("backbone",), init=False, repr=False)
    frozen_affine: str = dataclasses.field(default="inherited", init=False, repr=False)
    required: Tuple[str, ...] = dataclasses.field(default=("backbone",), init=False, repr=False)
    plan = _builtin_planner("plan_teacher")


@dataclasses.dataclass(frozen=True)
class Distill(StageConfig):
    """S3: a student under the frozen teacher of stage ``teacher``, eq. 8-11."""

    teacher: str = ""
    init: str = ""
    resolution: str = "low"
    teacher_features: str = "none"  # "downsample": resize a plain registrar teacher's features (teacher A-down)
    # FitNets: a trainable 1x1 conv per level maps the student's features to the teacher's channels before
    # eq. 9, so students whose channels differ (VM-light) can use feature distillation; the stage owns it
    feature_regressor: bool = False
    references: Tuple[str, ...] = dataclasses.field(default=("teacher", "init"), init=False, repr=False)
    default_resolution: str = dataclasses.field(default="low", init=False, repr=False)
    required: Tuple[str, ...] = dataclasses.field(default=("teacher",), init=False, repr=False)
    plan = _builtin_planner("plan_distill")


@dataclasses.dataclass(frozen=True)
class JointTeacher(StageConfig):
    """S1 and S2 trained together (teacher G)."""

    frozen_affine: str = dataclasses.field(default="unsupported", init=False, repr=False)
    plan = _builtin_planner("plan_joint_teacher")


@dataclasses.dataclass(frozen=True)
class JointAll(StageConfig):
    """S1, S2 and S3 trained together (teacher F); exports the student."""

    resolution: str = "low"
    frozen_affine: str = dataclasses.field(default="unsupported", init=False, repr=False)
    default_resolution: str = dataclasses.field(default="low", init=False, repr=False)
    plan = _builtin_planner("plan_joint_all")


@dataclasses.dataclass(frozen=True)
class Pretrained(StageConfig):
    """A finished model folder (``path``: a folder or a shipped model's name) loaded as this stage's result,
    not trained (``steps`` is ignored); later stages initialise from it (fine-tuning, ``config.init_from``)."""

    path: str = ""
    trains: bool = dataclasses.field(default=False, init=False, repr=False)
    required: Tuple[str, ...] = dataclasses.field(default=("path",), init=False, repr=False)


#: kind name -> its class (config fields and planner)
KINDS: Dict[str, Type[StageConfig]] = {}


def register_kind(
    name: str, cls: Optional[Type[StageConfig]] = None
) -> Union[Type[StageConfig], Callable[[Type[StageConfig]], Type[StageConfig]]]:
    """Makes stage kind ``name`` usable in ``config.stages`` (``kind = name``): ``cls`` is a frozen dataclass
    deriving from :class:`StageConfig` that implements :meth:`StageConfig.plan` (kinds that load rather than
    train, ``trains = False``, need none). ``@register_kind("name")`` is the decorator form."""
    if cls is None:
        return lambda c: register_kind(name, c)
    if not (isinstance(cls, type) and issubclass(cls, StageConfig) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"stage kind {name!r}: expected a dataclass deriving from StageConfig, got {cls!r}")
    if cls.trains and cls.plan is StageConfig.plan:
        raise TypeError(f"stage kind {name!r}: {cls.__name__} has no plan() (its planner)")
    KINDS[name] = cls
    return cls


for _name, _cls in (
    ("baseline", Baseline),
    ("cooperative", Cooperative),
    ("teacher", Teacher),
    ("distill", Distill),
    ("joint_teacher", JointTeacher),
    ("joint_all", JointAll),
    ("pretrained", Pretrained),
):
    register_kind(_name, _cls)


def _closest(word: str, options) -> str:
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else f" (valid: {', '.join(sorted(options))})"


def _block_dict(block) -> Dict[str, Any]:
    data = block.to_dict() if hasattr(block, "to_dict") else dict(block)
    return data


def parse_stage(name: str, block: Union[ml_collections.ConfigDict, Mapping[str, Any]]) -> StageConfig:
    """The typed config of stage ``name`` from its block (a ConfigDict or a dict)."""
    where = f"config.stages.{name}"
    data = _block_dict(block)
    kind = data.get("kind")
    if kind not in KINDS:
        raise InputError(f"{where}.kind", f"unknown stage kind {kind!r}{_closest(str(kind), KINDS)}")
    cls = KINDS[kind]
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise InputError(f"{where}.{key}", f"a '{kind}' stage has no field '{key}'{_closest(key, fields)}")
    if "steps" not in data:
        raise InputError(f"{where}.steps", "missing")
    for key in cls.required:
        if not data.get(key):
            raise InputError(f"{where}.{key}", f"a '{kind}' stage needs it (the stage it reads)")
    try:
        steps = int(data["steps"])
    except (TypeError, ValueError):
        raise InputError(f"{where}.steps", f"must be an integer, got {data['steps']!r}") from None
    if steps < 1:
        raise InputError(f"{where}.steps", f"must be at least 1, got {steps}")
    data["steps"] = steps
    if "resolution" in data and data["resolution"] not in RESOLUTIONS:
        raise InputError(f"{where}.resolution", f"must be 'high' or 'low', got {data['resolution']!r}")
    if data.get("augment", "") not in ("", "none", "bspline"):
        raise InputError(f"{where}.augment", f"must be '', 'none' or 'bspline', got {data['augment']!r}")
    if data.get("teacher_features", "none") not in ("none", "downsample"):
        raise InputError(f"{where}.teacher_features", f"must be 'none' or 'downsample', got {data['teacher_features']!r}")
    return cls(**data)


def parse_pipeline(config: ml_collections.ConfigDict) -> Dict[str, StageConfig]:
    """Every stage of ``config.pipeline``, typed, with its references checked to run earlier."""
    stages = {}
    for name in config.pipeline:
        if name not in config.stages:
            raise InputError("config.pipeline", f"stage '{name}' has no block in config.stages{_closest(name, config.stages)}")
        st = parse_stage(name, config.stages[name])
        for field in st.references:
            target = getattr(st, field)
            if target and target not in stages:
                later = " (it runs later)" if target in config.pipeline else ""
                raise InputError(f"config.stages.{name}.{field}", f"'{target}' is not a stage that runs before '{name}'{later}")
        stages[name] = st
    return stages
