"""docs/extending.md, executed: a new backbone through every stage kind and back out of model.json into
`crd-jax register`; a new distillation term added by one class and one config line."""

import json

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

import extending_example  # noqa: F401  (registers the backbone and the term)
from crd_jax.cli import main as cli
from crd_jax.config import base_config, stage
from crd_jax.training import pipeline


def _config(tmp_path):
    c = base_config()
    c.workdir = str(tmp_path / "run")
    c.data.synthetic.shape = (16, 16, 16)
    c.data.synthetic.train, c.data.synthetic.val, c.data.synthetic.test = 4, 0, 2
    c.model.backbone = "two_level_unet"
    c.model.channels = (4, 8)
    c.loss.beta = 0.0
    c.loss.terms.deformation_l1 = {"weight": 0.5}  # the new term: one config line
    c.train.batch_size = 1
    c.train.progress_bar = False
    c.train.log_every = 1
    c.eval.timing_repeats = 1
    c.pipeline = ("u_h", "u_l", "coop", "fst", "u_l_crd", "joint_t", "joint_all")
    c.stages = {
        "u_h": stage("baseline", resolution="high", steps=2),
        "u_l": stage("baseline", resolution="low", steps=2),
        "coop": stage("cooperative", steps=2, evaluate=False),
        "fst": stage("teacher", backbone="coop", steps=2),
        "u_l_crd": stage("distill", teacher="fst", init="u_l", steps=2),
        "joint_t": stage("joint_teacher", steps=2, evaluate=False),
        "joint_all": stage("joint_all", steps=2, evaluate=False),
    }
    return c


@pytest.mark.slow
def test_new_backbone_runs_every_stage_kind_and_registers_from_model_json(tmp_path, capsys):
    results = pipeline.run(_config(tmp_path))
    assert [r["label"] for r in results] == ["U2-H", "U2-L", "FST", "U2-L-CRD"]
    assert all(np.isfinite(r["dice_mean"]) for r in results)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    crd_steps = [m for m in metrics if m.get("stage") == "u_l_crd" and "loss" in m]
    assert crd_steps and all("deformation_l1" in m for m in crd_steps)
    model = tmp_path / "run" / "stages" / "u_l_crd" / "model"
    arch = json.loads((model / "model.json").read_text())["architecture"]
    assert arch["backbone"] == "two_level_unet" and arch["channels"] == [4, 8] and "decoder" not in arch
    rng = np.random.default_rng(0)
    for i in range(2):
        nib.save(nib.Nifti1Image(rng.random((20, 18, 16)).astype(np.float32), np.eye(4)), str(tmp_path / f"{i}.nii.gz"))
    assert cli.main(["register", "--model", str(model), "--fixed", str(tmp_path / "0.nii.gz"), "--moving",
                     str(tmp_path / "1.nii.gz"), "--out-dir", str(tmp_path / "out")]) == 0
    assert nib.load(str(tmp_path / "out" / "warped.nii.gz")).shape == (20, 18, 16)


def test_model_json_with_an_unknown_field_is_refused(tmp_path, capsys):
    from crd_jax.model_io import load_model, save_model

    c = _config(tmp_path)
    c.pipeline = ("u_l",)
    c.stages = {"u_l": stage("baseline", resolution="low", steps=1, evaluate=False)}
    pipeline.run(c)
    model = tmp_path / "run" / "stages" / "u_l" / "model"
    params, spec = load_model(model)
    spec.pop("format_version")
    spec["architecture"]["window_size"] = 7
    save_model(tmp_path / "odd", params, spec)
    f = tmp_path / "f.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(1).random((16, 16, 16)).astype(np.float32), np.eye(4)), str(f))
    assert cli.main(["register", "--model", str(tmp_path / "odd"), "--fixed", str(f), "--moving", str(f),
                     "--out-dir", str(tmp_path / "o")]) == 2
    assert "window_size" in capsys.readouterr().err


def test_new_term_value_against_a_direct_computation():
    from crd_jax.training import distill

    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.normal(size=(1, 4, 4, 4, 3)), jnp.float32) for _ in range(2))
    term = distill.TERMS["deformation_l1"](weight=0.5)
    assert float(term.value({"disp_low": a}, {"disp_low": b})) == pytest.approx(float(np.mean(np.abs(np.asarray(a - b)))), rel=1e-6)
    with pytest.raises(ValueError, match="unknown distillation term 'nope'"):
        c = base_config()
        c.loss.terms.nope = {"weight": 1.0}
        distill.terms_from_config(c.loss)


@pytest.mark.slow
def test_a_light_student_uses_feature_distillation_through_a_fitnets_regressor(tmp_path):
    from crd_jax.config import VM_LIGHT
    from crd_jax.training import distill
    from crd_jax.training.stages import plan_stage

    c = base_config()
    c.workdir = str(tmp_path / "run")
    c.data.synthetic.shape = (32, 32, 32)
    c.data.synthetic.train, c.data.synthetic.val, c.data.synthetic.test = 3, 0, 2
    c.train.batch_size, c.train.progress_bar, c.eval.timing_repeats = 1, False, 1
    c.loss.beta = 0.1  # feature distillation on, although the light student's channels differ from VM-H's
    c.pipeline = ("vm_h", "light")
    c.stages = {"vm_h": stage("baseline", resolution="high", steps=2, evaluate=False),
                "light": stage("distill", teacher="vm_h", resolution="high", model=VM_LIGHT, steps=3,
                               teacher_features="downsample", feature_regressor=True)}
    results = pipeline.run(c)
    assert results[0]["label"] == "VM-H-CRD" and np.isfinite(results[0]["dice_mean"])
    metrics = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["feature"] > 0 for m in metrics if m.get("stage") == "light" and "feature" in m)
    # the regressor: a 1x1 conv, i.e. a matrix product over channels
    reg = distill.init_regressor(jax.random.PRNGKey(0), {0: jnp.zeros((1, 4, 4, 4, 8))}, {0: jnp.zeros((1, 4, 4, 4, 16))})
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 4, 4, 8)), jnp.float32)
    np.testing.assert_allclose(distill.regress(reg, {0: x})[0], np.einsum("...c,cd->...d", x, reg["0"]["kernel"]), rtol=1e-5, atol=1e-5)
