"""benchmarks/train_budget.py runs end to end in a fresh process (--quick: 32^3, one round) and writes its table."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_writes_the_split_and_the_projected_hours(tmp_path):
    out = tmp_path / "budget"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_budget.py"), "--quick", "--stages", "vm_l",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads(out.with_suffix(".json").read_text())
    assert payload["shape"] == [32, 32, 32] and payload["torch_rows"] == []
    (row,) = payload["rows"]
    assert row["stage"] == "vm_l" and row["parameters"] > 0
    for key in ("forward_s", "backward_s", "loss_s", "step_s", "network_s"):
        assert row[key] >= 0.0
    assert row["step_s"] > 0 and row["network_s"] >= row["forward_s"]
    assert abs(payload["pipeline_hours"][""] - row["step_s"] * 10_000 / 3600) < 1e-9
    text = out.with_suffix(".md").read_text()
    assert "| VM-L |" in text and "Hours per 10,000 steps" in text and "**Pipeline (1 stages)**" in text


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
