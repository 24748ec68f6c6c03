"""benchmarks/conv_backward.py runs end to end in a fresh process (--quick: 32^3, two rounds) and writes its tables:
every layer of VM-H and VM-L timed under the old and the new weight-gradient kernel, and the whole steps."""

import pytest
from benchmark_runs import run_benchmark

from crd_jax.ops import native


@pytest.mark.slow
def test_quick_run_writes_the_old_and_new_kernels_per_layer_and_per_step(tmp_path):
    if not native.available():
        pytest.skip("the benchmark compares the native kernels")
    payload, text = run_benchmark("conv_backward.py", tmp_path / "conv_backward", "--quick", "--stages", "vm_l")
    assert payload["shape"] == [32, 32, 32] and set(payload["layers"]) == {"VM-H", "VM-L"}
    for rows in payload["layers"].values():
        assert len(rows) == 12
        for row in rows:
            assert row["wgrad_gflop"] > 0
            for key in ("forward_ms_old", "forward_ms_new", "wgrad_ms_old", "wgrad_ms_new", "wgrad_cpu_ms_new"):
                assert row[key] > 0
    (step,) = payload["steps"]
    assert step["stage"] == "vm_l" and step["step_s_old"] > 0 and step["step_s_new"] > 0
    assert payload["fma_peak_gflops"] > 0
    assert "| VM-L |" in text and "| conv 32x32x32, 16 -> 3 |" in text and "% of FMA peak" in text
    assert "GFLOP per CPU-s new" in text and "% of one core" in text
