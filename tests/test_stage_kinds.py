"""Typed stage configs: a misspelt field, an unknown kind, a missing reference or a stage that reads a
later one is an error naming the field (and the closest valid name), never a silent default."""

import importlib.util
from pathlib import Path

import pytest

from crd_jax.config import base_config, stage
from crd_jax.errors import InputError
from crd_jax.training import stage_kinds

ROOT = Path(__file__).resolve().parents[1]


def test_default_pipeline_parses_into_typed_stages():
    stages = stage_kinds.parse_pipeline(base_config())
    assert [type(s).__name__ for s in stages.values()] == ["Baseline", "Baseline", "Cooperative", "Teacher", "Distill"]
    assert stages["vm_l_crd"].teacher == "fst" and stages["vm_l_crd"].init == "vm_l" and stages["vm_l_crd"].resolution == "low"


@pytest.mark.parametrize(
    "field, value, where, message",
    [
        ("teachr", "fst", "config.stages.vm_l_crd.teachr", "did you mean 'teacher'?"),
        ("resolutoin", "low", "config.stages.vm_l_crd.resolutoin", "did you mean 'resolution'?"),
        ("backbone", "coop", "config.stages.vm_l_crd.backbone", "a 'distill' stage has no field 'backbone'"),
    ],
)
def test_misspelt_or_foreign_field(field, value, where, message):
    c = base_config()
    c.stages.vm_l_crd[field] = value
    with pytest.raises(InputError) as e:
        stage_kinds.parse_pipeline(c)
    assert e.value.source == where and message in e.value.problem


def test_unknown_kind_bad_values_and_references():
    c = base_config()
    c.stages.vm_h.kind = "basline"
    with pytest.raises(InputError, match="did you mean 'baseline'"):
        stage_kinds.parse_pipeline(c)
    c = base_config()
    c.stages.vm_h.resolution = "medium"
    with pytest.raises(InputError, match="'high' or 'low'"):
        stage_kinds.parse_pipeline(c)
    c = base_config()
    c.stages.vm_l_crd.teacher = "vm_l_crd_teacher"
    with pytest.raises(InputError, match="not a stage that runs before 'vm_l_crd'"):
        stage_kinds.parse_pipeline(c)
    c = base_config()
    c.pipeline = ("vm_h", "fst", "coop")
    with pytest.raises(InputError, match="runs later"):
        stage_kinds.parse_pipeline(c)
    c = base_config()
    c.stages.extra = stage("teacher")
    c.pipeline = ("vm_h", "extra")
    with pytest.raises(InputError, match="config.stages.extra.backbone"):
        stage_kinds.parse_pipeline(c)


def test_every_shipped_config_parses():
    for path in sorted((ROOT / "configs").rglob("*.py")):
        if path.name.startswith("_"):
            continue
        spec = importlib.util.spec_from_file_location(f"_c_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        stage_kinds.parse_pipeline(module.get_config())
