"""docs/extending.md, executed the way a fork uses it: the example module (tests/extending_example.py) is
copied into a folder of its own, a model is trained with it in one process, and ``crd-jax register`` loads
that model in another, fresh process, which knows the backbone only from what ``model.json`` records:

* as a module on ``PYTHONPATH``: imported only when the user allows it (``CRD_JAX_BACKBONE_MODULES`` or
  ``--allow-backbone-module``); without that, one line naming the file, the module and the flag, exit 2,
  and the module is not imported;
* as an installed package's entry point (group ``crd_jax.backbones``; a dist-info folder on ``PYTHONPATH``
  stands for ``pip install``): loaded without asking.

The new distillation term, similarity and stage kind run through a config in the training process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from crd_jax.config import base_config, stage
from crd_jax.errors import InputError
from crd_jax.training import pipeline

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = Path(__file__).with_name("extending_example.py")
CONFIG = Path(__file__).with_name("extending_config.py")
# appended to the copies only: proves whether a process imported the fork's module
MARKER_LINES = (
    '\nimport os as _os\nif _os.environ.get("FORK_IMPORT_MARKER"):\n    open(_os.environ["FORK_IMPORT_MARKER"], "a").close()\n'
)
ENTRY_POINTS = "[crd_jax.backbones]\ntwo_level_unet = extending_example:BACKBONE\n"


def _fork_folder(root: Path, entry_point: bool) -> Path:
    """A folder holding the example module, as a fork keeps it; with ``entry_point``, also the metadata
    ``pip install`` would write for a package declaring it in the ``crd_jax.backbones`` group."""
    folder = root / ("site" if entry_point else "fork")
    folder.mkdir()
    (folder / "extending_example.py").write_text(EXAMPLE.read_text() + MARKER_LINES)
    if entry_point:
        info = folder / "u2_fork-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: u2-fork\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return folder


def _env(pythonpath: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CRD_JAX_BACKBONE_MODULES", "FORK_IMPORT_MARKER")}
    env.update(PYTHONPATH=str(pythonpath), JAX_PLATFORMS="cpu", **extra)
    return env


def _crd_jax() -> list:
    script = Path(sys.executable).with_name("crd-jax")
    return [str(script)] if script.exists() else [sys.executable, "-m", "crd_jax"]


def _images(tmp_path: Path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"{i}.nii.gz")
        nib.save(nib.Nifti1Image(rng.random((20, 18, 16)).astype(np.float32), np.eye(4)), str(paths[-1]))
    return paths


def _register(model: Path, tmp_path: Path, out: str, env: dict, *flags: str) -> subprocess.CompletedProcess:
    fixed, moving = _images(tmp_path)
    return subprocess.run(
        [
            *_crd_jax(),
            "register",
            "--model",
            str(model),
            "--fixed",
            str(fixed),
            "--moving",
            str(moving),
            "--out-dir",
            str(tmp_path / out),
            *flags,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )


def _metrics(workdir: Path):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_fork_module_trains_every_stage_kind_and_registers_from_a_fresh_process_when_allowed(tmp_path):
    fork = _fork_folder(tmp_path, entry_point=False)
    run = tmp_path / "run"
    train = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"--config={CONFIG}", f"--config.workdir={run}"],
        capture_output=True,
        text=True,
        env=_env(fork),
        cwd=tmp_path,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    metrics = _metrics(run)
    crd_steps = [m for m in metrics if m.get("stage") == "u_l_crd" and "loss" in m]
    assert crd_steps and all("deformation_l1" in m for m in crd_steps)  # the new term, from one config line
    sym = [m for m in metrics if m.get("stage") == "sym" and "loss" in m]
    assert sym and all({"forward", "backward"} <= set(m) for m in sym)  # the new stage kind's own loss
    assert all(m["sim"] > 0 for m in sym)  # the new similarity (a mean absolute difference) in that stage ...
    assert all(m["sim"] < 0 for m in metrics if m.get("stage") == "u_h" and "sim" in m)  # ... NCC elsewhere
    results = (run / "results.md").read_text()
    assert all(f"| {label} |" in results for label in ("U2-H", "U2-L", "FST", "U2-L-CRD", "U2-H (sym)"))

    model = run / "stages" / "u_l_crd" / "model"
    spec = json.loads((model / "model.json").read_text())
    assert spec["architecture"]["backbone"] == "two_level_unet" and spec["architecture"]["channels"] == [4, 8]
    assert "decoder" not in spec["architecture"]
    assert spec["backbone_source"] == {"module": "extending_example"}

    # a fresh process that was not told the module may run: one line, exit 2, the module never imported
    marker = tmp_path / "imported"
    refused = _register(model, tmp_path, "refused", _env(fork, FORK_IMPORT_MARKER=str(marker)))
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in refused.stderr
    assert str(model / "model.json") in lines[0] and "extending_example" in lines[0]
    assert "--allow-backbone-module extending_example" in lines[0] and "CRD_JAX_BACKBONE_MODULES" in lines[0]
    assert not marker.exists() and not (tmp_path / "refused").exists()

    allowed = _register(
        model, tmp_path, "out", _env(fork, FORK_IMPORT_MARKER=str(marker)), "--allow-backbone-module", "extending_example"
    )
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert marker.exists()
    assert nib.load(str(tmp_path / "out" / "warped.nii.gz")).shape == (20, 18, 16)


API_TRAINING = """
from crd_jax.config import base_config, stage
from crd_jax.training import pipeline

c = base_config()
c.workdir = {workdir!r}
c.data.synthetic.shape = (16, 16, 16)
c.data.synthetic.train, c.data.synthetic.val, c.data.synthetic.test = 3, 0, 1
c.model.backbone = "two_level_unet"  # nothing imports the fork: the installed entry point provides it
c.train.batch_size, c.train.progress_bar, c.eval.timing_repeats = 1, False, 1
c.pipeline = ("u_l",)
c.stages = {{"u_l": stage("baseline", resolution="low", steps=2, evaluate=False)}}
pipeline.run(c)
"""


@pytest.mark.slow
def test_a_fork_installed_as_an_entry_point_trains_and_registers_without_a_flag(tmp_path):
    site = _fork_folder(tmp_path, entry_point=True)
    run = tmp_path / "run"
    train = subprocess.run(
        [sys.executable, "-c", API_TRAINING.format(workdir=str(run))],
        capture_output=True,
        text=True,
        env=_env(site),
        cwd=tmp_path,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    model = run / "stages" / "u_l" / "model"
    spec = json.loads((model / "model.json").read_text())
    assert spec["architecture"]["backbone"] == "two_level_unet"
    assert spec["backbone_source"] == {"entry_point": "two_level_unet"}
    done = _register(model, tmp_path, "out", _env(site))
    assert done.returncode == 0, done.stderr[-3000:]
    assert nib.load(str(tmp_path / "out" / "warped.nii.gz")).shape == (20, 18, 16)
    # the same folder where the package is not installed: one line saying what to install, exit 2
    gone = _register(model, tmp_path, "gone", _env(tmp_path / "nowhere"))
    assert gone.returncode == 2 and len(gone.stderr.strip().splitlines()) == 1
    assert "two_level_unet" in gone.stderr and "crd_jax.backbones" in gone.stderr and "install" in gone.stderr


def _fork_model(tmp_path: Path, **spec_extra) -> Path:
    """A model folder of the example's backbone, made in this process (no training)."""
    import extending_example  # noqa: F401  (registers the backbone here, for the parameters' shapes)
    from crd_jax.model_io import save_model
    from crd_jax.models.build import architecture, model_from_spec

    arch = architecture({"backbone": "two_level_unet", "channels": [4, 8]})
    spec = {
        "kind": "registrar",
        "architecture": arch,
        "factor": 1,
        "label": "U2-H",
        "stage": "test",
        "preprocessing": {"normalize": "minmax", "multiple": 4, "ndim": 3},
    }
    x = jnp.zeros((1, 16, 16, 16, 1))
    params = model_from_spec(spec).init(jax.random.PRNGKey(0), x, x)
    spec = {**spec, **spec_extra}
    spec["architecture"] = {**arch, **spec_extra.pop("architecture", {})}
    save_model(tmp_path / "model", params, spec)
    return tmp_path / "model"


def test_a_recorded_module_is_imported_only_with_the_users_word(tmp_path, monkeypatch):
    from crd_jax.model_io import load_spec

    module = "crd_fork_marker_test"
    (tmp_path / f"{module}.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'a').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.json").write_text(
        json.dumps(
            {
                "format_version": 2,
                "kind": "registrar",
                "factor": 1,
                "architecture": {"backbone": "fork_net"},
                "backbone_source": {"module": module},
            }
        )
    )
    with pytest.raises(InputError, match=f"module '{module}'.*--allow-backbone-module {module}") as exc:
        load_spec(folder)
    assert str(folder / "model.json") in str(exc.value) and not (tmp_path / "imported").exists()
    with pytest.raises(InputError, match="registers no backbone"):  # allowed: imported (it registers nothing)
        load_spec(folder, allowed_modules=[module])
    assert (tmp_path / "imported").exists()
    (folder / "model.json").write_text(
        json.dumps(
            {
                "format_version": 2,
                "kind": "registrar",
                "factor": 1,
                "architecture": {"backbone": "fork_net"},
                "backbone_source": {"module": "os; import evil"},
            }
        )
    )
    with pytest.raises(InputError, match="backbone_source.module"):
        load_spec(folder)


def test_model_json_with_an_unknown_field_is_refused_in_a_fresh_process(tmp_path):
    fork = _fork_folder(tmp_path, entry_point=False)
    model = _fork_model(tmp_path, architecture={"window_size": 7})
    assert json.loads((model / "model.json").read_text())["backbone_source"] == {"module": "extending_example"}
    done = _register(model, tmp_path, "o", _env(fork, CRD_JAX_BACKBONE_MODULES="extending_example"))
    assert done.returncode == 2 and "window_size" in done.stderr and "Traceback" not in done.stderr


def test_a_model_of_a_backbone_without_a_recorded_source_says_so(tmp_path):
    model = _fork_model(tmp_path)
    spec = json.loads((model / "model.json").read_text())
    spec.pop("backbone_source")  # as a script (``__main__``) registering it would leave it
    (model / "model.json").write_text(json.dumps(spec))
    done = _register(model, tmp_path, "o", _env(tmp_path / "nowhere"))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "unknown backbone 'two_level_unet'" in done.stderr and "Traceback" not in done.stderr


def test_new_term_value_against_a_direct_computation():
    import extending_example  # noqa: F401
    from crd_jax.training import distill

    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.normal(size=(1, 4, 4, 4, 3)), jnp.float32) for _ in range(2))
    term = distill.TERMS["deformation_l1"](weight=0.5)
    assert float(term.value({"disp_low": a}, {"disp_low": b})) == pytest.approx(
        float(np.mean(np.abs(np.asarray(a - b)))), rel=1e-6
    )
    with pytest.raises(ValueError, match="unknown distillation term 'nope'"):
        c = base_config()
        c.loss.terms.nope = {"weight": 1.0}
        distill.terms_from_config(c.loss)


def test_new_similarity_by_name_against_numpy_and_unknown_names_refused_when_the_config_is_checked():
    import extending_example  # noqa: F401
    from crd_jax import losses
    from crd_jax.training.config_checks import check_values

    rng = np.random.default_rng(0)
    f, m = (rng.random((1, 6, 5, 4, 1)).astype(np.float32) for _ in range(2))
    sim = losses.similarity("mae", window=9)
    assert float(sim(jnp.asarray(f), jnp.asarray(m))) == pytest.approx(float(np.mean(np.abs(f - m))), rel=1e-6)
    c = base_config()
    c.loss.similarity = "mea"
    with pytest.raises(InputError, match="config.loss.similarity.*unknown similarity 'mea'.*mae"):
        check_values(c)
    c = base_config()
    c.stages = {"x": stage("baseline", steps=1, loss={"similarity": "nope"})}
    with pytest.raises(InputError, match="config.stages.x.loss.similarity"):
        check_values(c)


def test_a_stage_kind_is_one_registration_with_its_planner():
    import dataclasses

    import extending_example  # noqa: F401
    from crd_jax.training import stage_kinds

    st = stage_kinds.parse_stage("sym", stage("symmetric", steps=3))
    assert type(st).__name__ == "Symmetric" and st.steps == 3 and st.resolution == "high"
    with pytest.raises(InputError, match="did you mean 'resolution'"):
        stage_kinds.parse_stage("sym", {"kind": "symmetric", "steps": 1, "resoluton": "low"})

    @dataclasses.dataclass(frozen=True)
    class NoPlanner(stage_kinds.StageConfig):
        pass

    with pytest.raises(TypeError, match="has no plan"):
        stage_kinds.register_kind("no_planner", NoPlanner)
    assert "no_planner" not in stage_kinds.KINDS


@pytest.mark.slow
def test_a_light_student_uses_feature_distillation_through_a_fitnets_regressor(tmp_path):
    from crd_jax.config import VM_LIGHT
    from crd_jax.training import distill

    c = base_config()
    c.workdir = str(tmp_path / "run")
    c.data.synthetic.shape = (32, 32, 32)
    c.data.synthetic.train, c.data.synthetic.val, c.data.synthetic.test = 3, 0, 2
    c.train.batch_size, c.train.progress_bar, c.eval.timing_repeats = 1, False, 1
    c.loss.beta = 0.1  # feature distillation on, although the light student's channels differ from VM-H's
    c.eval.diagnostics = False  # covered by the default pipeline's test; here they would double the test's time
    c.pipeline = ("vm_h", "light")
    c.stages = {
        "vm_h": stage("baseline", resolution="high", steps=2, evaluate=False),
        "light": stage(
            "distill",
            teacher="vm_h",
            resolution="high",
            model=VM_LIGHT,
            steps=3,
            teacher_features="downsample",
            feature_regressor=True,
        ),
    }
    results = pipeline.run(c)
    assert results[0]["label"] == "VM-H-CRD" and np.isfinite(results[0]["dice_mean"])
    metrics = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["feature"] > 0 for m in metrics if m.get("stage") == "light" and "feature" in m)
    # the regressor: a 1x1 conv, i.e. a matrix product over channels
    reg = distill.init_regressor(jax.random.PRNGKey(0), {0: jnp.zeros((1, 4, 4, 4, 8))}, {0: jnp.zeros((1, 4, 4, 4, 16))})
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 4, 4, 8)), jnp.float32)
    np.testing.assert_allclose(
        distill.regress(reg, {0: x})[0], np.einsum("...c,cd->...d", x, reg["0"]["kernel"]), rtol=1e-5, atol=1e-5
    )


def test_a_backbone_registered_by_a_config_file_records_no_module_that_would_not_import(tmp_path):
    """A config loaded by path gets a made-up module name (``_crd_config_<stem>``, ml_collections'
    ``config_config``); recording it would send another process to import a module that does not exist, or
    some other module of that name. A module importable as itself is recorded."""
    from crd_jax.cli.common import load_config
    from crd_jax.models import backbones

    body = (
        "import dataclasses\n"
        "from crd_jax.config import base_config\n"
        "from crd_jax.models import backbones\n"
        "backbones.register_backbone(dataclasses.replace(backbones.REGISTRY['voxelmorph'], name='{name}', module=''))\n"
        "def get_config():\n    return base_config()\n"
    )
    cfg = tmp_path / "cfg_inline.py"
    cfg.write_text(body.format(name="inline_net"))
    load_config(str(cfg))
    assert backbones.source("inline_net") is None
    module = tmp_path / "fork_pkg_src.py"
    module.write_text(body.format(name="module_net"))
    sys.path.insert(0, str(tmp_path))
    try:
        __import__("fork_pkg_src")
        assert backbones.source("module_net") == {"module": "fork_pkg_src"}
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("inline_net", "module_net"):
            backbones.REGISTRY.pop(name, None)
        sys.modules.pop("fork_pkg_src", None)


def test_finetune_takes_the_allow_backbone_module_flag_its_error_names():
    out = subprocess.run([sys.executable, "-m", "crd_jax", "finetune", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "--allow-backbone-module MODULE" in out.stdout
