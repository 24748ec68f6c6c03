"""The experiment statistics (benchmarks/crd_stats.py) against scipy and closed forms."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import crd_stats  # noqa: E402


def test_t_interval_matches_scipy():
    from scipy import stats

    x = [0.004, -0.001, 0.006, 0.002, 0.003]
    r = crd_stats.t_interval(x)
    lo, hi = stats.t.interval(0.95, 4, loc=np.mean(x), scale=stats.sem(x))
    assert r["low"] == pytest.approx(lo) and r["high"] == pytest.approx(hi)
    assert r["p"] == pytest.approx(stats.ttest_1samp(x, 0).pvalue)


def test_holm_adjusts_step_down():
    out = crd_stats.holm({"a": 0.01, "b": 0.04})
    assert out["a"]["p_holm"] == pytest.approx(0.02) and out["a"]["level"] == pytest.approx(0.025)
    assert out["b"]["p_holm"] == pytest.approx(0.04) and out["b"]["level"] == pytest.approx(0.05)
    out = crd_stats.holm({"a": 0.03, "b": 0.02})  # monotone: the larger p is never adjusted below the smaller's
    assert out["a"]["p_holm"] == pytest.approx(0.04) and out["b"]["p_holm"] == pytest.approx(0.04)


def test_holm_stops_at_the_first_hypothesis_it_does_not_reject():
    out = crd_stats.holm({"a": 0.01, "b": 0.04})  # 0.01 <= 0.025, then 0.04 <= 0.05: both rejected
    assert out["a"]["rejected"] and out["b"]["reached"] and out["b"]["rejected"]
    out = crd_stats.holm({"a": 0.03, "b": 0.045})  # 0.03 > 0.025: stop; b is not rejected although 0.045 <= 0.05
    assert out["a"]["reached"] and not out["a"]["rejected"]
    assert not out["b"]["reached"] and not out["b"]["rejected"]
    for pv in ({"a": 0.001, "b": 0.2}, {"a": 0.03, "b": 0.045}, {"a": 0.01, "b": 0.04}, {"a": 0.5, "b": 0.01}):
        for r in crd_stats.holm(pv).values():  # the same decision as the adjusted p-value's
            assert r["rejected"] == (r["p_holm"] <= crd_stats.ALPHA)


def _streams_with_p(p, mean_sign=1.0, sd=0.002):
    """Five per-stream values whose one-sample t-test against 0 has two-sided p-value ``p``."""
    from scipy import stats

    z = np.array([-1.5, -0.5, 0.0, 0.5, 1.5])
    z = (z - z.mean()) / z.std(ddof=1)
    t = stats.t.isf(p / 2, 4)
    return mean_sign * t * sd / np.sqrt(5) + sd * z


def test_an_arm_the_step_down_does_not_reach_is_not_supported_though_its_interval_excludes_0():
    """Holm with p = 0.03 and 0.045 rejects neither: the arm of p = 0.045 has a Holm-level (95%) interval above 0,
    yet CRD is not supported (the decision the interval alone had made before)."""
    ids = [f"S{i}" for i in range(6)]
    pairs = [(m, f) for m in ids for f in ids if m != f]
    control = {s: {q: 0.6 for q in pairs} for s in range(5)}

    def arm(values):
        return {s: {q: 0.6 + float(values[s]) for q in pairs} for s in range(5)}

    per_pair = {"ctl": control, "first": arm(_streams_with_p(0.03, -1.0)), "second": arm(_streams_with_p(0.045))}
    out = crd_stats.analyse(per_pair, "ctl", ["first", "second"], refute_below=0.003, draws=200)
    first, second = out["arms"]["first"], out["arms"]["second"]
    assert first["t"]["p"] == pytest.approx(0.03) and second["t"]["p"] == pytest.approx(0.045)
    assert second["t_holm"]["low"] > 0 and not second["holm"]["reached"]
    assert not second["supports_crd"] and not first["below_control"] and not out["supported"]
    # with the first arm rejected the step-down reaches the second, which is then supported
    per_pair["first"] = arm(_streams_with_p(0.01, -1.0))
    out = crd_stats.analyse(per_pair, "ctl", ["first", "second"], refute_below=0.003, draws=200)
    assert out["arms"]["first"]["below_control"] and out["arms"]["second"]["supports_crd"] and out["supported"]


def _tables(shift, streams=5, subjects=6, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    ids = [f"S{i}" for i in range(subjects)]
    control, arm = {}, {}
    for s in range(streams):
        control[s] = {(m, f): 0.6 + 0.01 * rng.normal() for m in ids for f in ids if m != f}
        arm[s] = {p: v + shift + noise * rng.normal() for p, v in control[s].items()}
    return arm, control


def test_bootstrap_of_a_constant_difference_is_that_constant():
    arm, control = _tables(0.004)
    diffs = crd_stats.stream_differences(arm, control)
    r = crd_stats.two_level_bootstrap(diffs, draws=200)
    assert r["low"] == pytest.approx(0.004) and r["high"] == pytest.approx(0.004)


def test_bootstrap_interval_widens_with_noise_and_covers_the_true_shift():
    arm, control = _tables(0.004, noise=0.01)
    r = crd_stats.two_level_bootstrap(crd_stats.stream_differences(arm, control), draws=2000)
    assert r["low"] < 0.004 < r["high"] and r["high"] - r["low"] > 0.001


def test_analyse_supports_a_clear_effect_and_refutes_a_null():
    arm, control = _tables(0.01, noise=0.002)
    null, _ = _tables(0.0, noise=0.0005, seed=1)
    null = {s: {p: control[s][p] + (v - 0.6) * 0.01 for p, v in null[s].items()} for s in null}
    out = crd_stats.analyse({"ctl": control, "crd": arm, "crd2": null}, "ctl", ["crd", "crd2"], refute_below=0.003, draws=500)
    assert out["arms"]["crd"]["supports_crd"] and out["supported"]
    assert not out["arms"]["crd2"]["supports_crd"]
    assert not out["refuted"]  # one arm is clearly above the bound
    with pytest.raises(ValueError, match="different pairs"):
        crd_stats.stream_differences({0: {("a", "b"): 1.0}}, {0: {("b", "a"): 1.0}})


def test_bootstrap_redraws_subject_draws_that_form_no_pair():
    """With 2 subjects half the subject draws hold one subject twice (no ordered pair of distinct subjects);
    they are drawn again, so the interval stays finite and equals the only two pairs' spread."""
    diffs = {s: {("A", "B"): 0.01 * (s + 1), ("B", "A"): 0.01 * (s + 1)} for s in range(3)}
    r = crd_stats.two_level_bootstrap(diffs, draws=500)
    assert np.isfinite(r["low"]) and np.isfinite(r["high"])
    assert 0.01 <= r["low"] <= r["high"] <= 0.03
