"""Statistics of the pre-registered CRD experiments (``configs/lpba40_crd_exp1.py``): paired CRD - control
differences per stream of training pairs, a t-interval over streams, a two-level bootstrap (streams, then
validation subjects with their ordered pairs re-formed) and Holm's correction across the CRD arms.

Pure numpy/scipy functions of per-pair Dice tables; ``tests/test_crd_stats.py`` checks them against scipy and
closed forms."""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np

Pair = Tuple[str, str]  # (moving id, fixed id)


def stream_differences(
    arm: Mapping[int, Mapping[Pair, float]], control: Mapping[int, Mapping[Pair, float]]
) -> Dict[int, Dict[Pair, float]]:
    """Per stream, per validation pair: Dice(arm) - Dice(control). Both must cover the same streams and pairs."""
    if set(arm) != set(control):
        raise ValueError(f"streams differ: {sorted(arm)} vs {sorted(control)}")
    out = {}
    for s in arm:
        if set(arm[s]) != set(control[s]):
            raise ValueError(f"stream {s}: the arms were evaluated on different pairs")
        out[s] = {p: float(arm[s][p]) - float(control[s][p]) for p in arm[s]}
    return out


def t_interval(values: Sequence[float], level: float = 0.95) -> Dict[str, float]:
    """Mean, Student-t interval (df = n - 1) and two-sided one-sample p-value against 0."""
    from scipy import stats

    x = np.asarray(values, np.float64)
    n = len(x)
    mean = float(x.mean())
    if n < 2:
        return {"mean": mean, "low": float("nan"), "high": float("nan"), "p": float("nan"), "n": n, "sd": float("nan")}
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / np.sqrt(n)
    if sd == 0:
        p = 0.0 if mean != 0 else 1.0
    else:
        p = float(2 * stats.t.sf(abs(mean) / (sd / np.sqrt(n)), n - 1))
    return {"mean": mean, "low": mean - half, "high": mean + half, "p": p, "n": n, "sd": sd, "level": level}


def two_level_bootstrap(
    diffs: Mapping[int, Mapping[Pair, float]], draws: int = 10_000, level: float = 0.95, seed: int = 0
) -> Dict[str, float]:
    """Percentile interval of the mean difference when both the streams and the validation subjects are
    resampled: each draw takes the streams with replacement, then the subjects with replacement, and forms
    every ordered pair of two distinct drawn subjects (a subject drawn twice contributes its pairs twice). A
    draw of the subjects that holds fewer than two distinct ones forms no pair and is drawn again (about 1 in
    7,800 with 6 subjects: left in, its empty mean made the whole percentile interval NaN)."""
    streams = sorted(diffs)
    subjects = sorted({s for pairs in diffs.values() for p in pairs for s in p})
    index = {s: i for i, s in enumerate(subjects)}
    k = len(subjects)
    tables = np.full((len(streams), k, k), np.nan)
    for i, s in enumerate(streams):
        for (m, f), d in diffs[s].items():
            tables[i, index[m], index[f]] = d
    rng = np.random.default_rng(seed)
    stats = np.empty(draws)
    for b in range(draws):
        chosen = tables[rng.integers(len(streams), size=len(streams))]
        subj = rng.integers(k, size=k)
        while k > 1 and np.unique(subj).size < 2:
            subj = rng.integers(k, size=k)
        mi, fi = np.meshgrid(subj, subj, indexing="ij")
        keep = mi != fi
        vals = chosen[:, mi[keep], fi[keep]]
        stats[b] = np.nanmean(vals)
    lo, hi = np.percentile(stats, [50 * (1 - level), 50 * (1 + level)])
    return {"low": float(lo), "high": float(hi), "draws": draws, "level": level}


#: the family-wise error rate of the protocol's Holm correction
ALPHA = 0.05


def holm(pvalues: Mapping[str, float], alpha: float = ALPHA) -> Dict[str, Dict[str, float]]:
    """Holm's step-down procedure: per hypothesis its adjusted p-value, its test level (alpha / (m - rank)),
    whether the step-down reaches it (every hypothesis of a smaller p was rejected) and whether it is rejected
    (reached and p <= its level; equivalently adjusted p <= alpha). The procedure stops at the first hypothesis
    it does not reject: those after it are not rejected whatever their own p."""
    names = sorted(pvalues, key=lambda n: pvalues[n])
    m = len(names)
    out, running, reached = {}, 0.0, True
    for rank, name in enumerate(names):
        adjusted = min(1.0, (m - rank) * pvalues[name])
        running = max(running, adjusted)
        level = alpha / (m - rank)
        rejected = reached and pvalues[name] <= level
        out[name] = {
            "p": float(pvalues[name]),
            "p_holm": float(running),
            "level": float(level),
            "reached": bool(reached),
            "rejected": bool(rejected),
        }
        reached = rejected
    return out


def analyse(
    per_pair: Mapping[str, Mapping[int, Mapping[Pair, float]]],
    control: str,
    arms: Sequence[str],
    refute_below: float,
    draws: int = 10_000,
) -> Dict:
    """The protocol's analysis. ``per_pair[arm][stream][(moving, fixed)] = Dice``."""
    out = {"arms": {}}
    pvals = {}
    for arm in arms:
        diffs = stream_differences(per_pair[arm], per_pair[control])
        per_stream = {s: float(np.mean(list(d.values()))) for s, d in sorted(diffs.items())}
        t = t_interval(list(per_stream.values()))
        out["arms"][arm] = {"per_stream": per_stream, "t": t, "bootstrap": two_level_bootstrap(diffs, draws)}
        pvals[arm] = t["p"]
    adjusted = holm(pvals)
    for arm in arms:
        r = out["arms"][arm]
        r["holm"] = adjusted[arm]
        # the interval at the Holm level of this arm (e.g. 97.5% for the smaller p of two)
        values = list(r["per_stream"].values())
        r["t_holm"] = t_interval(values, 1 - adjusted[arm]["level"])
        # Holm's decision: the step-down rejects this arm's null (its interval at its level then excludes 0; an
        # arm the step-down does not reach is not rejected even where that interval excludes 0)
        r["supports_crd"] = bool(adjusted[arm]["rejected"] and r["t"]["mean"] > 0)
        # descriptive, not one of the protocol's decisions: the same rejection, on the side below the control
        r["below_control"] = bool(adjusted[arm]["rejected"] and r["t"]["mean"] < 0)
    out["refuted"] = all(out["arms"][a]["t"]["high"] < refute_below for a in arms)
    out["supported"] = any(out["arms"][a]["supports_crd"] for a in arms)
    return out
