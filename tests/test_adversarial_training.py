"""What users do to a running command: change the config of a workdir and resume, start a second train.py
on the same workdir, press Ctrl-C or send SIGTERM while train.py trains or while ``register --io-steps``
optimises. Each case is a fresh subprocess on a tiny run (compilation costs ~10-25 s of CPU per start on two
cores: these tests are kept apart from tests/test_adversarial.py)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_adversarial import ENV as _ENV, _register, assets, snapshot  # noqa: F401 (assets: a fixture)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
TINY = [
    f"--config={ROOT / 'configs' / 'synthetic_vm_2d.py'}",
    "--config.train.progress_bar=False",
    "--config.data.synthetic.shape=(32,32)",
    "--config.data.synthetic.train=4",
    "--config.data.synthetic.val=0",
    "--config.data.synthetic.test=0",
    "--config.pipeline=('vm_l',)",
    "--config.stages.vm_l.evaluate=False",
    "--config.train.batch_size=2",
    "--config.train.log_every=1",
]


def _train(workdir, *args, timeout=300):
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *TINY, f"--config.workdir={workdir}", *args],
        capture_output=True,
        text=True,
        cwd=workdir.parent,
        env=ENV,
        timeout=timeout,
    )


def _errors(stderr):
    return [l for l in stderr.strip().splitlines() if l.startswith("error:")]


@pytest.mark.slow
def test_a_workdir_refuses_a_changed_config_unless_told_and_keeps_its_history(tmp_path):
    work = tmp_path / "run"
    first = _train(work, "--config.stages.vm_l.steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    config_json = (work / "config.json").read_bytes()
    before = snapshot(tmp_path)
    for change, field in (
        (["--config.train.lr=0.0005"], "config.train.lr"),
        (["--config.seed=7"], "config.seed"),
        (["--config.stages.vm_l.steps=3"], "config.stages.vm_l.steps"),
    ):
        proc = _train(work, "--config.stages.vm_l.steps=2", *change)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {field}: changed from") and "--allow-config-change" in lines[0]
        assert snapshot(tmp_path) == before
    allowed = _train(work, "--config.stages.vm_l.steps=2", "--config.train.lr=0.0005", "--allow-config-change")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert (work / "config.json").read_bytes() == config_json  # the first config stays
    history = [json.loads(l) for l in (work / "config_history.jsonl").read_text().splitlines()]
    assert len(history) == 1 and history[0]["changed"] == {"train.lr": [0.001, 0.0005]}
    assert history[0]["config"]["train"]["lr"] == 0.0005


@pytest.mark.slow
def test_a_second_train_py_on_a_busy_workdir_is_refused(tmp_path):
    from crd_jax.training import workdir_config

    work = tmp_path / "run"
    assert _train(work, "--config.stages.vm_l.steps=1").returncode == 0
    workdir_config.lock(work)  # this process holds the workdir, as a running train.py would
    try:
        before = snapshot(tmp_path)
        proc = _train(work, "--config.stages.vm_l.steps=1")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert _errors(proc.stderr) == [l for l in proc.stderr.strip().splitlines() if "another training process" in l]
        assert len(_errors(proc.stderr)) == 1 and f"pid {os.getpid()}" in proc.stderr
        assert snapshot(tmp_path) == before
    finally:
        os.close(workdir_config._locks.pop(str(work.absolute())))


@pytest.mark.parametrize("signum,status,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
@pytest.mark.slow
def test_a_signal_while_training_exits_with_one_line_and_resumes(tmp_path, signum, status, word):
    work = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *TINY, f"--config.workdir={work}", "--config.stages.vm_l.steps=100000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=ENV,
    )
    metrics = work / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count('"loss"') >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err[-3000:]  # not 139 (a segmentation fault in the teardown)
    assert "Fatal Python error" not in err and "Traceback" not in err
    assert len(_errors(err)) == 1 and word in _errors(err)[0]
    assert list((work / "stages" / "vm_l" / "ckpt").glob("[0-9]*"))  # the interrupted step was kept


def test_resume_rules_without_training(tmp_path):
    """The rules of :func:`workdir_config.check_resume` on a workdir record (no training needed)."""
    from crd_jax.config import base_config
    from crd_jax.errors import InputError
    from crd_jax.training import workdir_config
    from crd_jax.config import stage

    c = base_config()
    c.workdir = str(tmp_path)
    c.pipeline = ("vm_h", "vm_l")
    (tmp_path / "config.json").write_text(c.to_json_best_effort(indent=2, sort_keys=True))
    (tmp_path / "stages" / "vm_h").mkdir(parents=True)  # vm_h has started, vm_l has not
    c.train.progress_bar, c.train.deadline = False, 123.0  # free settings
    assert workdir_config.check_resume(c, tmp_path) != {}
    c.stages.vm_l.steps = 7  # a stage that has not started
    c.stages.extra = stage("baseline", resolution="low", steps=3)
    c.pipeline = ("vm_h", "vm_l", "extra")  # appended
    workdir_config.check_resume(c, tmp_path)
    for field, value in (
        ("pipeline", ("vm_l", "vm_h")),
        ("stages.vm_h.steps", 9),
        ("loss.alpha", 0.5),
        ("data.normalize", "minmax"),
        ("eval.max_pairs", 3),
    ):
        d = base_config()
        d.workdir = str(tmp_path)
        d.pipeline = ("vm_h", "vm_l")
        node = d
        parts = field.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
        with pytest.raises(InputError, match=rf"config\.{field}: changed from"):
            workdir_config.check_resume(d, tmp_path)
        assert workdir_config.check_resume(d, tmp_path, allow=True)


def test_fields_a_newer_version_added_at_their_defaults_are_not_changes(tmp_path):
    """A workdir recorded by an older crd-jax lacks the fields added since; resuming it with their defaults
    (what the old run did) is no change, a non-default value of such a field is one."""
    import json

    from crd_jax.config import base_config
    from crd_jax.errors import InputError
    from crd_jax.training import workdir_config

    c = base_config()
    c.workdir = str(tmp_path)
    old = json.loads(c.to_json_best_effort())
    del old["model"]["teacher_output"], old["loss"]["student_term"], old["init_from"], old["finetune"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    (tmp_path / "stages" / "vm_h").mkdir(parents=True)
    assert workdir_config.check_resume(c, tmp_path) == {}
    c.loss.student_term = False
    with pytest.raises(InputError, match=r"config\.loss\.student_term: changed from None to False"):
        workdir_config.check_resume(c, tmp_path)


@pytest.mark.parametrize("signum,status,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
@pytest.mark.slow
def test_signal_during_instance_optimisation_ends_it_at_once(tmp_path, assets, signum, status, word):  # noqa: F811
    """A million Adam steps: the signal ends the command within seconds, with one line, nothing written."""
    before = snapshot(tmp_path)
    argv = _register(tmp_path, assets, extra=("--io-steps", "1000000"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "crd_jax", *map(str, argv)],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as from a terminal: a pytest-xdist worker ignores SIGINT, a child inherits that, and Python keeps an
        # inherited SIG_IGN (the command then never sees the Ctrl-C this test sends)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(8)  # model loaded, programs compiled: inside the optimisation
    assert proc.poll() is None
    sent = time.perf_counter()
    proc.send_signal(signum)
    # The bound proves the chunking (a million steps take hours), not a latency; a timeout shows the stderr.
    try:
        _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"still running 240 s after the signal; stderr: {err[-2000:]}") from None
    assert time.perf_counter() - sent < 240
    assert proc.returncode == status, err[-3000:]
    assert len(err.strip().splitlines()) == 1 and word in err and "Traceback" not in err
    assert snapshot(tmp_path) == before
