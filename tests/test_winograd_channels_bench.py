"""benchmarks/winograd_channels.py runs end to end in a fresh process (--quick: 32^3, two rounds) and writes its
table; --render rebuilds the same table from the JSON."""

import pytest
from benchmark_runs import run_benchmark, run_script

from crd_jax.ops import native


def test_quick_run_times_every_channel_count_both_ways(tmp_path):
    if not native.available() or not native.winograd():
        pytest.skip("the Winograd path needs the native kernel on AVX-512")
    payload, text = run_benchmark("winograd_channels.py", tmp_path / "wc", "--quick")
    assert payload["shape"] == [32, 32, 32] and payload["default_threshold"] == 8
    assert len(payload["rows"]) == 8
    for row in payload["rows"].values():
        assert row["everywhere"] > 0 and row["default"] > 0 and row["direct"] > 0
    assert "| conv 3 -> 16 |" in text and "| flow head 16 -> 3, input gradient |" in text
    run_script("winograd_channels.py", "--render", str(tmp_path / "wc.json"), "--out", str(tmp_path / "again"))
    assert (tmp_path / "again.md").read_text() == text
