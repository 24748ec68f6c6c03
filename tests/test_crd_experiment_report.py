"""``python benchmarks/crd_experiment.py --report`` on a run folder written to disk (the stages' ``eval.json``,
``gate.json``, a distillation stage's ``diagnostics.json``), in a fresh process: the teacher phase, the gate, a
descriptive per-stream table while streams are missing, and the protocol's analysis and verdict once all five
streams have finished, with the per-stream differences equal to numpy's."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from benchmark_runs import run_script

from configs.lpba40_crd_exp1 import ARMS, SEEDS

SUBJECTS = ["S35", "S36", "S37", "S38", "S39", "S40"]
PAIRS = [(m, f) for f in SUBJECTS for m in SUBJECTS if m != f]


def _stage(work, name, label, dice):
    rows = [{"moving": m, "fixed": f, "dice": float(d)} for (m, f), d in zip(PAIRS, dice)]
    body = {
        "label": label,
        "dice_mean": float(np.mean(dice)),
        "dice_std": float(np.std(dice)),
        "folds_mean": 0.0,
        "num_pairs": len(rows),
        "pairs": rows,
    }
    (work / "stages" / name).mkdir(parents=True, exist_ok=True)
    (work / "stages" / name / "eval.json").write_text(json.dumps(body))


def _run_folder(tmp_path, streams, effect):
    """A finished teacher phase and ``streams`` finished streams; CRD (paper) = control + ``effect`` + noise,
    CRD (code) = control + noise."""
    rng = np.random.default_rng(0)
    work = tmp_path / "run"
    for name, label, mean in [("vm_ll", "VM-LL", 0.62), ("vm_h_15k", "VM-H (15k)", 0.65), ("fst_full", "FST (full)", 0.65)]:
        _stage(work, name, label, mean + 0.01 * rng.standard_normal(len(PAIRS)))
    gate = {
        "fst_choice_train_dice": {"fst_half": 0.66, "fst_full": 0.67},
        "fst": "fst_full",
        "fst_val_dice": 0.65,
        "vm_ll_val_dice": 0.62,
        "ceiling_val_dice": 0.635,
        "fst_minus_vm_ll": 0.03,
        "ceiling_minus_vm_ll": 0.015,
        "threshold": 0.01,
        "passed": True,
    }
    (work / "gate.json").write_text(json.dumps(gate))
    dice = {}
    for s in streams:
        ctl = 0.625 + 0.01 * rng.standard_normal(len(PAIRS))
        dice[s] = {
            "ctl": ctl,
            "crd_paper": ctl + effect + 0.001 * rng.standard_normal(len(PAIRS)),
            "crd_code": ctl + 0.001 * rng.standard_normal(len(PAIRS)),
        }
        for arm in ARMS:
            _stage(work, f"{arm}_s{s}", f"{arm} {s}", dice[s][arm])
    diag = {
        "stage": "crd_paper_s0",
        "ceiling": {"fst_full": {"ceiling_dice": 0.64}},
        "teacher_train_dice": 0.67,
        "student_train_dice_start": 0.64,
        "student_train_dice_end": 0.65,
        "field_distance_start": 1.5,
        "field_distance_end": 0.9,
        "term_gradients_at_start": {"loss_L": {"weight": 1.0, "grad_norm": 0.2}},
    }
    if streams:
        (work / "stages" / "crd_paper_s0" / "diagnostics.json").write_text(json.dumps(diag))
    return work, dice


def _report(tmp_path, work, experiment=1):
    out = tmp_path / "out"
    run_script(
        "crd_experiment.py",
        *("--experiment", str(experiment), "--report", "--workdir", str(work), "--out", str(out), "--draws", "500"),
        timeout=300,
    )
    name = f"crd_experiment{experiment}"
    payload = json.loads((out / f"{name}.json").read_text())
    return payload, (out / f"{name}.md").read_text(), (out / f"{name}_summary.md").read_text()


def test_the_readme_summary_says_where_an_experiment_is(tmp_path):
    payload, _, summary = _report(tmp_path, tmp_path / "never-started", experiment=2)
    assert not payload["started"] and summary.strip().endswith("not started.") and "lpba40_crd_exp2.py" in summary
    work = tmp_path / "teacher"
    _stage(work, "vm_h", "VM-H", 0.6 + np.zeros(len(PAIRS)))
    (work / "config.json").write_text(json.dumps({"stages": {"vm_h": {"steps": 10}, "vm_l": {"steps": 10}}}))
    (work / "metrics.jsonl").write_text(json.dumps({"stage": "vm_l", "step": 4, "loss": 0.1}) + "\n")
    payload, _, summary = _report(tmp_path, work, experiment=2)
    assert payload["started"] and "teacher phase under way; finished: VM-H" in summary
    assert "training: vm_l step 4 of 10" in summary
    # a stage trained without a validation of its own (S1) counts as finished once its model is saved
    for name in ("vm_h", "coop"):
        (work / "stages" / name / "model").mkdir(parents=True)
    payload, _, summary = _report(tmp_path, work, experiment=2)
    assert payload["teacher_finished"] == ["vm_h", "coop"] and "finished: VM-H, coop;" in summary
    # a stage restored from the package is said so in the report
    restored = [{"stage": "vm_h", "from": "crd_jax/pretrained/lpba40-vm-h-128", "at": "2026-12-06 00:00:00"}]
    (work / "restored.json").write_text(json.dumps(restored))
    payload, text, _ = _report(tmp_path, work, experiment=2)
    assert payload["restored"] == restored
    assert "Restored from the package (trained by an earlier run of this protocol" in text and "lpba40-vm-h-128" in text


def test_partial_streams_are_reported_descriptively_with_the_diagnostics(tmp_path):
    work, dice = _run_folder(tmp_path, [0, 1], effect=0.02)
    payload, text, summary = _report(tmp_path, work)
    assert payload["gate"]["passed"] and "**passed**" in text and "| FST (full) |" in text
    assert payload["streams_finished"] == [0, 1] and "analysis" not in payload and "Verdict" not in text
    for s in (0, 1):
        row = payload["streams"][str(s)]
        assert row["crd_paper_minus_ctl"] == pytest.approx(np.mean(dice[s]["crd_paper"] - dice[s]["ctl"]), abs=1e-9)
        assert row["ctl"] == pytest.approx(np.mean(dice[s]["ctl"]), abs=1e-9)
    assert "2 of 5 streams finished" in text and "wait for all five streams" in text
    assert payload["diagnostics"][0]["stage"] == "crd_paper_s0" and "#### Distillation diagnostics" in text
    assert "| crd_paper_s0 | fst_full 0.6400 |" in text
    assert "gate passed (FST - VM-LL +0.0300" in summary and "students: 2 of 5 streams finished." in summary
    # a student training: its stage was added to the run's config by the student phase (config_history.jsonl),
    # after the teacher phase's config.json
    (work / "config.json").write_text(json.dumps({"stages": {"vm_ll": {"steps": 10}}}))
    student_config = {"stages": {"vm_ll": {"steps": 10}, "crd_paper_s2": {"steps": 600}}}
    (work / "config_history.jsonl").write_text(json.dumps({"config": student_config}) + "\n")
    (work / "metrics.jsonl").write_text(json.dumps({"stage": "crd_paper_s2", "step": 250, "loss": 0.1}) + "\n")
    payload, _, summary = _report(tmp_path, work)
    assert payload["progress"] == {"crd_paper_s2": {"step": 250, "steps": 600}}
    assert "students: 2 of 5 streams finished; training: crd_paper_s2 step 250 of 600." in summary


@pytest.mark.slow
@pytest.mark.parametrize(
    "effect, verdict",
    [
        (0.02, "CRD supported"),
        (0.0, "CRD refuted in this regime"),
        (-0.01, "CRD refuted in this regime: both upper bounds below +0.003; crd_paper scored below the control (Holm"),
    ],
)
def test_five_streams_give_the_intervals_and_the_protocols_verdict(tmp_path, effect, verdict):
    work, dice = _run_folder(tmp_path, list(SEEDS), effect=effect)
    payload, text, summary = _report(tmp_path, work)
    paper = payload["analysis"]["arms"]["crd_paper"]
    expected = [np.mean(dice[s]["crd_paper"] - dice[s]["ctl"]) for s in SEEDS]
    assert list(paper["per_stream"].values()) == pytest.approx(expected, abs=1e-9)
    assert paper["t"]["mean"] == pytest.approx(np.mean(expected), abs=1e-9)
    assert f"Verdict: **{verdict}" in text and "wait for all five streams" not in text
    assert f"crd_paper - control {np.mean(expected):+.4f} (t 95% [{paper['t']['low']:+.4f}" in summary
    assert f"**{verdict}" in summary and (("below the control" in summary) == (effect < 0))


def test_a_run_resumed_past_a_passed_gate_keeps_the_students_in_its_pipeline(tmp_path):
    """The defect this guards: a run interrupted during the student phase refused to resume (its first
    pipeline was the teacher phase alone, which drops the recorded students)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import crd_experiment

    from crd_jax.errors import InputError
    from crd_jax.training import workdir_config

    crd_experiment.select(1)
    work = tmp_path / "run"
    args = crd_experiment.parser().parse_args(["--workdir", str(work), "--data-root", str(tmp_path)])
    args.workdir = work
    teacher = crd_experiment.run_config(args)
    assert list(teacher.pipeline) == list(crd_experiment.protocol.TEACHER_PIPELINE)
    work.mkdir()
    (work / "gate.json").write_text(json.dumps({"fst": "fst_full", "passed": True}))
    students = crd_experiment.run_config(args)
    assert list(students.pipeline)[: len(teacher.pipeline)] == list(teacher.pipeline)
    assert {"ctl_s4", "crd_paper_s0", "crd_code_s2"} <= set(students.pipeline)
    workdir_config.record(students, work)  # the run folder as the student phase leaves it
    (work / "stages" / "ctl_s0").mkdir(parents=True)
    workdir_config.check_resume(crd_experiment.run_config(args), work)  # resumes
    with pytest.raises(InputError, match="only appending stages is allowed"):
        workdir_config.check_resume(teacher, work)


def test_a_dry_run_that_forced_the_gate_resumes_into_its_student_phase(tmp_path):
    """--force-gate (dry runs, with --steps) ran the students past a failed gate; resumed, the run's first pipeline
    was the teacher phase alone, which the run folder refused (it records the students)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import crd_experiment

    crd_experiment.select(2)
    try:
        _check_forced_gate_resume(crd_experiment, tmp_path)
    finally:
        crd_experiment.select(1)  # the module's default protocol, as other tests import it


def _check_forced_gate_resume(crd_experiment, tmp_path):
    work = tmp_path / "run"
    work.mkdir()
    (work / "gate.json").write_text(json.dumps({"fst": "fst_half", "passed": False}))
    base = ["--experiment", "2", "--workdir", str(work), "--data-root", str(tmp_path), "--steps", "2"]
    for extra, students in (([], False), (["--force-gate"], True)):
        args = crd_experiment.parser().parse_args(base + extra)
        args.workdir = work
        pipeline = list(crd_experiment.run_config(args).pipeline)
        assert ("crd_paper_s0" in pipeline) == students
    real = crd_experiment.parser().parse_args(base[:-2] + ["--force-gate"])  # without --steps: no forcing
    real.workdir = work
    assert "crd_paper_s0" not in crd_experiment.run_config(real).pipeline


def _streams_with_p(p, sign=1.0, sd=0.002):
    """Five per-stream differences whose one-sample t-test against 0 has two-sided p-value ``p``."""
    from scipy import stats

    z = np.array([-1.5, -0.5, 0.0, 0.5, 1.5])
    z = (z - z.mean()) / z.std(ddof=1)
    return sign * stats.t.isf(p / 2, 4) * sd / np.sqrt(5) + sd * z


def _arms_folder(tmp_path, paper, code):
    """A passed gate and five streams whose CRD - control differences are ``paper[s]`` / ``code[s]`` on every pair."""
    work, _ = _run_folder(tmp_path, [], effect=0.0)
    for s in SEEDS:
        ctl = 0.62 + 0.001 * np.arange(len(PAIRS)) / len(PAIRS)
        _stage(work, f"ctl_s{s}", "ctl", ctl)
        _stage(work, f"crd_paper_s{s}", "paper", ctl + paper[s])
        _stage(work, f"crd_code_s{s}", "code", ctl + code[s])
    return work


@pytest.mark.slow
def test_an_arm_holm_does_not_reach_is_reported_so_and_not_supported(tmp_path):
    """p = 0.03 (code, below the control) and 0.045 (paper, above): Holm stops at the first; the paper arm's 95%
    interval excludes 0, but the report says its test was not reached and CRD is not supported."""
    work = _arms_folder(tmp_path, _streams_with_p(0.045), _streams_with_p(0.03, -1.0))
    payload, text, summary = _report(tmp_path, work)
    paper = payload["analysis"]["arms"]["crd_paper"]
    assert paper["t"]["p"] == pytest.approx(0.045, rel=1e-3) and paper["t_holm"]["low"] > 0
    assert not paper["holm"]["reached"] and not payload["analysis"]["supported"]
    assert "| not reached (Holm stopped at the arm of smaller p) |" in text
    assert "Verdict: **inconclusive" in text and "inconclusive" in summary


@pytest.mark.slow
def test_a_supported_effect_below_the_refutation_bound_gets_both_verdicts(tmp_path):
    small = 0.001 + 0.0001 * np.array([-1.5, -0.5, 0.0, 0.5, 1.5])  # clearly above 0, clearly below +0.003
    work = _arms_folder(tmp_path, small, small)
    payload, text, _ = _report(tmp_path, work)
    assert payload["analysis"]["supported"] and payload["analysis"]["refuted"]
    assert "Verdict: **CRD supported" in text and "but smaller than +0.003" in text


def test_a_run_on_a_busy_folder_is_refused_before_it_restores_anything(tmp_path):
    """Another process trains in the folder: the second invocation stops at the folder's lock, before copying
    shipped stages into it (a model folder planted there would break the first run when its stage finishes)."""
    import subprocess

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import crd_experiment

    from crd_jax.errors import InputError

    work = tmp_path / "run"
    work.mkdir()
    code = (
        "import sys, time; from crd_jax.training import workdir_config as w; "
        "w.lock(sys.argv[1]); print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(work)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        crd_experiment.select(2)
        args = crd_experiment.parser().parse_args(["--experiment", "2", "--data-root", str(tmp_path)])
        args.workdir = work
        with pytest.raises(InputError, match="another training process"):
            crd_experiment.run(args)
        assert not (work / "stages").exists() and not (work / "restored.json").exists()
    finally:
        holder.kill()
