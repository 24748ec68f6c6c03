"""benchmarks/conv_backward.py runs end to end in a fresh process (--quick: 32^3, two rounds) and writes its tables:
every layer of VM-H and VM-L timed under the old and the new weight-gradient kernel, and the whole steps."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from crd_jax.ops import native

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_run_writes_the_old_and_new_kernels_per_layer_and_per_step(tmp_path):
    if not native.available():
        pytest.skip("the benchmark compares the native kernels")
    out = tmp_path / "conv_backward"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "conv_backward.py"), "--quick", "--stages", "vm_l", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads(out.with_suffix(".json").read_text())
    assert payload["shape"] == [32, 32, 32] and set(payload["layers"]) == {"VM-H", "VM-L"}
    for rows in payload["layers"].values():
        assert len(rows) == 12
        for row in rows:
            assert row["wgrad_gflop"] > 0
            for key in ("forward_ms_old", "forward_ms_new", "wgrad_ms_old", "wgrad_ms_new"):
                assert row[key] > 0
    (step,) = payload["steps"]
    assert step["stage"] == "vm_l" and step["step_s_old"] > 0 and step["step_s_new"] > 0
    assert payload["fma_peak_gflops"] > 0
    text = out.with_suffix(".md").read_text()
    assert "| VM-L |" in text and "| conv 32x32x32, 16 -> 3 |" in text and "% of FMA peak" in text
