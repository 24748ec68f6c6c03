"""``bash benchmarks/gpu_science.sh --small``: the GPU science script's dry run on CPU, as a user runs it (two
fresh processes, files on disk): it times steps, trains into its deadline, stops cleanly with a checkpoint,
returns its state in at most 8 files, and the next call resumes from that state; neither leaves its run folder in
the temporary folder."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))


def _call(tmp_path, out, *args):
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = dict(
        os.environ, OUT=str(out), GPU_SCIENCE_DIR=str(tmp_path / "gs"), PYTHON=sys.executable, TMPDIR=str(tmp_path / "tmp")
    )
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_science.sh"), "--small", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "gpu_science.json").read_text())


@pytest.mark.slow
def test_small_dry_run_stops_at_its_deadline_and_the_next_call_resumes(tmp_path):
    # enough steps per stage that no machine finishes the teacher phase inside the limit: the deadline must act
    # (the script stops 30 s before its limit: a 20 s deadline here; the second call's has passed when it starts, so
    # it resumes, trains a step and stops: the loop checks the deadline after each step)
    first = _call(tmp_path, tmp_path / "out1", "--limit", "50", "--timing-budget", "15", "--small-steps", "3000")
    assert not first["resumed"] and first["finished"] is False and "deadline reached" in first["stopped"]
    assert "step_s" in first["step_timings"]["VM-H"] and first["step_timings"]["VM-H"]["step_s"] > 0
    assert first["wall_s"] < 60 and len(list((tmp_path / "out1").iterdir())) <= 8
    done_first = {s: p["step"] for s, p in first["progress"].items()}
    assert done_first and all(v >= 1 for v in done_first.values())
    with tarfile.open(tmp_path / "out1" / "state.tar.gz") as tar:
        names = tar.getnames()
    assert any("/ckpt/" in n for n in names) and not any("tensorboard" in n for n in names)
    second = _call(tmp_path, tmp_path / "out2", "--limit", "31", "--timing-budget", "0", "--small-steps", "3000")
    assert second["resumed"]
    log = (tmp_path / "out2" / "log.txt").read_text()
    assert "resuming from step" in log or "finished earlier" in log
    # the run moved on: a later stage, or more steps of the same one
    from configs.lpba40_crd_exp2 import TEACHER_PIPELINE

    def where(r):
        at = r.get("stopped_at") or {"stage": TEACHER_PIPELINE[-1], "step": 10**9}
        return TEACHER_PIPELINE.index(at["stage"]), at["step"]

    assert where(second) > where(first)
    # each call's run folder went with its process (its state is in $OUT); the data link stays for the next call
    assert [p.name for p in (tmp_path / "tmp").glob("crd_gpu_science_*") if not p.is_symlink()] == []


def test_pack_and_restore_round_trip_in_parts(tmp_path, monkeypatch):
    import gpu_science

    run = tmp_path / "a" / "run"
    (run / "stages" / "x").mkdir(parents=True)
    payload = os.urandom(3000)
    (run / "stages" / "x" / "params.msgpack").write_bytes(payload)
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events").write_text("big")
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(gpu_science, "PART", 1000)
    names = gpu_science.pack(run, out)
    assert len(names) >= 2 and all(n.startswith("state.tar.gz.") for n in names)
    target = tmp_path / "b" / "run"
    target.mkdir(parents=True)
    (target / "stale").write_text("from an earlier call")
    assert gpu_science.restore(out, target)
    assert (target / "stages" / "x" / "params.msgpack").read_bytes() == payload
    assert not (target / "tensorboard").exists() and not (target / "stale").exists()
