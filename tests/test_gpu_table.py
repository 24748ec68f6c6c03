"""benchmarks/gpu_table.py's merging and rendering of Table II (the README's GPU table is rebuilt from two runs)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_table  # noqa: E402


def _row(model, factor, mem, latency, **extra):
    return {"model": model, "factor": factor, "framework": "jax", "device_peak_mb": mem, "latency_s": latency, **extra}


def test_a_later_run_replaces_the_same_model_and_factor_and_keeps_the_rest():
    first = {"rows": [_row("vm", 1, 1000.0, 0.2), _row("torch_same", 4, 0, 0, error=["RuntimeError:", "x"])]}
    second = {"rows": [_row("torch_same", 4, 50.0, 0.01)]}
    rows = gpu_table.merge_rows([first, second])
    assert [(r["model"], r["factor"]) for r in rows] == [("vm", 1), ("torch_same", 4)]
    assert "error" not in rows[1] and rows[1]["device_peak_mb"] == 50.0


def test_ratios_are_against_the_same_models_h_row_and_failures_are_named():
    rows = [
        _row("vm", 1, 1000.0, 0.2, xla_total_mb=400.0),
        _row("vm", 2, 150.0, 0.03),
        {"model": "torch_same", "factor": 4, "error": ["RuntimeError:", "sizes"]},
    ]
    text = gpu_table.render("GPU", (8, 8, 8), 3, rows)
    lines = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| VM")}
    assert "| 1000 | 400 | 0.2000 | 100% | 100% | 3307 | 0.156 |" in lines["| VM-H"]
    assert "| 150 | - | 0.0300 | 15% | 15% | 551 | 0.023 |" in lines["| VM-L"]
    assert "failed: RuntimeError: sizes" in lines["| VM (PyTorch)-LL"]


def test_render_option_rebuilds_the_files_without_measuring(tmp_path):
    body = {"machine": {}, "device": "GPU", "shape": [8, 8, 8], "repeats": 3, "rows": [_row("vm", 1, 10.0, 0.5)]}
    run = tmp_path / "run.json"
    run.write_text(json.dumps(body))
    out = tmp_path / "merged"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_table.py"), "--render", str(run), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    assert json.loads(out.with_suffix(".json").read_text())["rows"] == body["rows"]
    assert "Rebuilt by `benchmarks/gpu_table.py --render` from `run.json`" in out.with_suffix(".md").read_text()
