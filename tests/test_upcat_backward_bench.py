"""benchmarks/upcat_backward.py runs end to end in a fresh process (--quick: 32^3, two rounds) and writes its table."""

from benchmark_runs import run_benchmark


def test_quick_run_times_every_decoder_level_both_ways(tmp_path):
    payload, text = run_benchmark("upcat_backward.py", tmp_path / "upcat", "--quick")
    assert payload["shape"] == [32, 32, 32] and len(payload["rows"]) == 3
    assert payload["modes"] == ["coarse_split", "coarse"]
    for row in payload["rows"].values():
        assert row["coarse"] > 0 and row["coarse_split"] > 0
    assert "| up(16x16x16) ++ skip 32x32x32, 32+2 -> 16, forward + backward |" in text
