"""benchmarks/train_budget.py runs end to end in a fresh process (--quick: 32^3, one round) and writes its table."""

import json
import os
import sys
from pathlib import Path

import pytest
from benchmark_runs import run_benchmark, run_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_run_writes_the_split_and_the_projected_hours_and_with_bf16_both_precisions(tmp_path):
    """One process: the float32 table, and where the CPU runs bfloat16 (AVX512-BF16 or AMX), ``--bf16``'s rows
    timed in the same rounds; ``--render`` rebuilds the tables from the JSON."""
    from crd_jax.ops import native

    bf16 = native.has_bf16()
    payload, text = run_benchmark(
        "train_budget.py", tmp_path / "budget", "--quick", "--stages", "vm_l", *(["--bf16"] if bf16 else [])
    )
    assert payload["shape"] == [32, 32, 32] and payload["torch_rows"] == []
    row = payload["rows"][0]
    assert row["stage"] == "vm_l" and row["parameters"] > 0
    for key in ("forward_s", "backward_s", "loss_s", "step_s", "network_s"):
        assert row[key] >= 0.0
    assert row["step_s"] > 0 and row["network_s"] >= row["forward_s"]
    assert abs(payload["pipeline_hours"][""] - row["step_s"] * 10_000 / 3600) < 1e-9
    assert "| VM-L |" in text and "Hours per 10,000 steps" in text and "**Pipeline (1 stages)**" in text
    # the networks' ratio (forward + backward over forward) beside the step's
    ratios = f"| {row['network_s'] / row['forward_s']:.1f}x | {row['step_s'] / row['forward_s']:.1f}x |"
    assert "| Networks / forward | Step / forward |" in text and ratios in text
    # --render rebuilds the same tables from the JSON, in a fresh process
    run_script("train_budget.py", "--render", str(tmp_path / "budget.json"), "--out", str(tmp_path / "again"), timeout=300)
    assert (tmp_path / "again.md").read_text() == text
    assert row["forward_gflop"] > 0 and row["backward_gflop"] > 0 and payload["fma_peak_gflops"] > 0
    assert "| Stage | Forward GFLOP | Forward GFLOP/s | % of peak |" in text
    # --quick's two steps back to back after the rounds, and the pipeline's hours at their mean
    # (no order against the rounds' minimum: with --quick's one round, that "minimum" is a single call)
    times = row["loop_step_times_s"]
    assert row["loop_steps"] == len(times) == 2 and min(times) > 0
    assert row["loop_step_mean_s"] == pytest.approx(sum(times) / 2) and row["loop_step_max_s"] == max(times)
    assert payload["pipeline_hours_back_to_back"][""] == pytest.approx(row["loop_step_mean_s"] * 10_000 / 3600)
    assert f"| {row['loop_step_mean_s'] / row['step_s']:.2f}x | {row['loop_step_mean_s'] * 10_000 / 3600:.1f} |" in text
    # the README's lines, written beside the tables and again by --render
    summary = (tmp_path / "budget_summary.md").read_text()
    assert f"**{payload['pipeline_hours']['']:.1f} h** at each stage's fastest step" in summary
    assert f"**{payload['pipeline_hours_back_to_back']['']:.1f} h** at the mean of 2 steps" in summary
    assert (tmp_path / "again_summary.md").read_text() == summary
    if not bf16:
        assert len(payload["rows"]) == 1
        return
    f32, b16 = payload["rows"]
    assert (f32["precision"], b16["precision"]) == ("float32", "bf16") and f32["runs"] == b16["runs"]
    (ratio,) = payload["bf16_ratios"]
    assert ratio["step"] == pytest.approx(b16["step_s"] / f32["step_s"])
    assert ratio["step_cpu"] == pytest.approx(b16["step_cpu_s"] / f32["step_cpu_s"])
    assert set(payload["pipeline_hours"]) == {"", "bf16"}
    assert "| VM-L [bf16] |" in text and "Step bf16 / float32" in text


@pytest.mark.slow
def test_quick_run_with_the_teacher_cache_adds_the_cached_s3_row_and_its_pipeline_hours(tmp_path):
    payload, text = run_benchmark("train_budget.py", tmp_path / "budget", "--quick", "--stages", "vm_l_crd", "--teacher-cache")
    assert payload["fusion"] == "compact"
    s3, cached = payload["rows"]
    assert (s3["stage"], s3["variant"]) == ("vm_l_crd", "")
    assert (cached["stage"], cached["variant"]) == ("vm_l_crd", "teacher cached")
    fill = max(s3["forward_s"] - cached["forward_s"], 0.0) * 24 * 23 / 3600
    expected = cached["step_s"] * 10_000 / 3600 + fill  # the one stage's hours, S3 replaced by its cached step
    assert abs(payload["pipeline_hours"]["with S3's teacher cached"] - expected) < 1e-9
    assert "**Pipeline, S3's teacher cached** (+" in text
    # the same arithmetic at the back-to-back means
    at_mean = cached["loop_step_mean_s"] * 10_000 / 3600 + fill
    assert payload["pipeline_hours_back_to_back"]["with S3's teacher cached"] == pytest.approx(at_mean)
    assert "| **Pipeline, S3's teacher cached** (at the minima: " in text


def test_readme_summary_counts_float32_rows_says_what_failed_and_is_empty_without_back_to_back_steps():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_budget import render_summary

    def row(stage, step, mean, variant="", precision="float32", forward=0.1):
        return {
            "stage": stage,
            "label": stage.upper(),
            "variant": variant,
            "precision": precision,
            "forward_s": forward,
            "step_s": step,
            "loop_steps": 4,
            "loop_step_mean_s": mean,
        }

    def payload(rows):
        machine = {"cpu": "CPU X", "cpus": 2}
        return {"rows": rows, "steps_per_stage": 3600, "machine": machine, "shape": [8, 8, 8], "batch": 1}

    # 3600 steps: hours = seconds per step; bf16 rows and the failed stage are left out of the totals
    rows = [row("vm_h", 0.5, 0.75, forward=0.2), row("vm_l", 0.1, 0.25, forward=0.02), row("vm_h", 0.4, 0.5, precision="bf16")]
    text = render_summary(payload(rows + [{"stage": "coop", "label": "S1", "variant": "", "error": "boom"}]))
    assert "**0.6 h** at each stage's fastest step, **1.0 h** at the mean of 4 steps" in text
    assert "each of 2 stages; failed, so not counted: S1)" in text
    assert "2.5-5.0x its networks' forward (above 3.5x: VM_L)." in text
    # a --before-after run: the "after" rows, named as such; one stage: "stage"
    text = render_summary(payload([row("vm_l", 0.3, 0.4, "before"), row("vm_l", 0.2, 0.3, "after")]))
    assert "`benchmarks/train_budget.py`, after, 3,600 steps for each of 1 stage)" in text
    assert "**0.2 h** at each stage's fastest step, **0.3 h** at the mean" in text and "above 3.5x" not in text
    # runs from before --loop-steps: no summary
    old = [{k: v for k, v in r.items() if not k.startswith("loop_")} for r in rows]
    assert render_summary(payload(old)) == ""


def test_back_to_back_summary_is_numpys_median_mean_and_max():
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_budget import back_to_back_summary

    assert back_to_back_summary([]) == {}
    for times in ([0.5], [0.3, 0.9], [0.4, 0.1, 2.0, 0.35], [1.0, 0.2, 0.3, 0.25, 5.0]):
        got = back_to_back_summary(times)
        assert got["loop_steps"] == len(times) and got["loop_step_times_s"] == times
        assert got["loop_step_median_s"] == pytest.approx(np.median(times))
        assert got["loop_step_mean_s"] == pytest.approx(np.mean(times))
        assert got["loop_step_max_s"] == max(times)


def test_network_only_proxy_replaces_the_registration_loss_and_restores_it():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import jax.numpy as jnp

    import train_budget
    from crd_jax import losses

    real = losses.registration_loss
    disp = jnp.full((1, 4, 4, 4, 3), 2.0)
    with train_budget.network_only():
        value, terms = losses.Objective()({"moving": jnp.zeros((1, 4, 4, 4, 1)), "fixed": jnp.zeros((1, 4, 4, 4, 1))}, disp)
        assert float(value) == 2.0 and set(terms) == {"sim", "reg"}
    assert losses.registration_loss is real


def test_profile_tables_are_rebuilt_from_their_json_with_gradients_net_of_the_forward(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import train_budget

    row = {
        "layer": "conv 8x8x8, 16 -> 16",
        "forward": 0.010,
        "input grad": 0.025,
        "weight grad": 0.030,
        "forward + backward": 0.045,
    }
    payload = {
        "shape": [8, 8, 8],
        "batch": 1,
        "repeats": 2,
        "conv": "native",
        "machine": {"cpu": "x", "cpus": 2},
        "steps": [{"label": "VM-L", "forward_s": 0.1, "backward_s": 0.2, "loss_s": 0.3, "step_s": 0.6}],
        "models": {"VM-L": [row, {**row, "layer": "first"}]},
        "loss": {"warp": 0.002},
        "hlo": {
            "vm_l": {
                "custom_calls": {"crd_conv_fwd": 3},
                "xla": {"convolution": 0, "gather": 0, "scatter": 0, "reduce-window": 24},
            }
        },
    }
    del payload["models"]["VM-L"][1]["input grad"]
    text = train_budget.render_profile(payload)
    assert "| conv 8x8x8, 16 -> 16 | 10.0 | 15.0 | 20.0 | 35.0 | 3.5x |" in text
    assert "| first | 10.0 | - | 20.0 | 35.0 | 3.5x |" in text
    assert "| VM-L | crd_conv_fwd x3 | 0 | 0 | 0 | 24 |" in text
    (tmp_path / "p.json").write_text(json.dumps(payload))
    run_script("train_budget.py", "--render-profile", str(tmp_path / "p.json"), timeout=300)
    assert (tmp_path / "p.md").read_text() == text


_XLA_FLOPS = """
import json, sys
sys.path.insert(0, sys.argv[1])
import jax
import train_budget as tb
shape = (32, 32, 32)
data = tb._batch(shape, 1, seed=1)
plans = tb.plan_pipeline(tb.pipeline_config(shape), shape, 1, ("fst", "fst_full", "vm_l_crd"))
out = {}
for name, plan in plans.items():
    loss, p, fr = plan.loss_fn, plan.init_params, plan.frozen
    with tb.network_only():
        cost = lambda f: (lambda c: c[0] if isinstance(c, list) else c)(jax.jit(f).lower(p).compile().cost_analysis())
        xla = [cost(lambda p: loss(p, fr, data)[0])["flops"], cost(jax.grad(lambda p: loss(p, fr, data)[0]))["flops"]]
    # lax's form of the fused upsample-and-concatenate convolves the stored concatenation, so its input gradient
    # also covers a frozen skip's channels, which nothing reads (the native backward leaves them out)
    calls = []
    with tb.network_only(), tb.recording_layers(calls):
        jax.eval_shape(jax.grad(lambda p: loss(p, fr, data)[0]), p)
    live = tb.live_convolutions(loss, p, fr, data)
    frozen_skip = sum(
        tb.layer_flops(c) * c["skip"][-1] / c["w"][-2]
        for i, c in enumerate(calls)
        if i in live and c["op"] == "upcat" and c["d_inputs"] and not c["d_skip"]
    )
    out[name] = {"ours": tb.network_flops(loss, p, fr, data), "xla": xla, "frozen_skip": frozen_skip}
print(json.dumps(out))
"""


def test_network_flops_count_the_convolutions_as_xlas_cost_analysis_does():
    """train_budget's FLOP count of a stage's networks (the live convolutions of its loss, their useful
    multiply-adds; weight and input gradients where a derivative flows) against XLA's own count of the same stage
    with the native kernel off (lax.conv, a fresh process), forward and forward + backward: both FSTs (VM-H's
    backbone frozen, its head trained; the full-resolution head also reads F^H_0) and S3 (the FST frozen, the VM-L
    student trained), whose frozen networks run forward only and compute outputs nothing reads (XLA drops them),
    less the input gradient lax's form computes for a frozen skip's channels (the native backward does not)."""
    import subprocess

    env = dict(os.environ, CRD_JAX_FAST_CONV="0")
    cmd = [sys.executable, "-c", _XLA_FLOPS, str(ROOT / "benchmarks")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    for name, r in json.loads(done.stdout.strip().splitlines()[-1]).items():
        ours, (forward, gradient) = r["ours"], r["xla"]
        gradient -= r["frozen_skip"]  # what lax computes and discards: not useful work
        # XLA's counts also hold the elementwise work (bias, activations, upsampling, the terms): under 2%
        assert 0.98 * forward <= ours["forward"] <= forward, (name, ours, forward)
        assert 0.98 * gradient <= ours["forward"] + ours["backward"] <= gradient, (name, ours, gradient)
