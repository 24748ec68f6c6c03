"""Progress of a (possibly running) pipeline from its ``metrics.jsonl``: steps done per stage, speed, time left."""

from __future__ import annotations

import json
from pathlib import Path


def read_progress(metrics: Path):
    """``{stage: {"step", "first_time", "last_time", "steps_per_s", "val_dice"}}`` from a metrics log."""
    progress = {}
    if not metrics.exists():
        return progress
    for line in metrics.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if "stage" not in r:  # a message line
            continue
        p = progress.setdefault(r["stage"], {"step": 0, "steps_per_s": None, "val_dice": None})
        p["step"] = max(p["step"], int(r["step"]))
        if "steps_per_s" in r:
            p["steps_per_s"] = float(r["steps_per_s"])
        if "val/dice" in r:
            p["val_dice"] = float(r["val/dice"])
    return progress


def print_status(config, workdir: Path, steps_override: int = 0) -> None:
    progress = read_progress(workdir / "metrics.jsonl")
    print(f"workdir {workdir}" + ("" if workdir.exists() else " (not started)"))
    left_s, unknown = 0.0, False
    rate_of = {}
    for name in config.pipeline:
        steps = steps_override or int(config.stages[name].steps)
        p = progress.get(name, {"step": 0, "steps_per_s": None, "val_dice": None})
        finished = (workdir / "stages" / name / "model").exists()
        done = steps if finished else p["step"]
        rate = p["steps_per_s"]
        if rate:
            rate_of[name] = rate
        remaining = 0 if finished else steps - done
        if remaining and rate:
            left_s += remaining / rate
        elif remaining:
            unknown = True
        val = f"val Dice {p['val_dice']:.4f}" if p["val_dice"] is not None else ""
        speed = f"{rate:.2f} steps/s" if rate else ""
        state = "done" if finished else ("running" if done else "waiting")
        print(f"  {name:12s} {done:6d}/{steps:<6d} {state:8s} {speed:14s} {val}")
    suffix = " (+ stages not started yet, speed unknown)" if unknown else ""
    print(f"time left (training only): {left_s / 60:.0f} min{suffix}")
