"""benchmarks/loss_speed.py runs end to end in a fresh process (--quick: 32^3, two rounds) and writes its table."""

from benchmark_runs import run_benchmark


def test_quick_run_times_every_piece_before_and_after(tmp_path):
    payload, text = run_benchmark("loss_speed.py", tmp_path / "loss", "--quick")
    assert payload["shape"] == [32, 32, 32] and payload["steps"] == []
    assert len(payload["pieces"]) == 6
    for piece in payload["pieces"].values():
        for variant in ("before", "after"):
            assert piece[variant]["wall_s"] > 0 and piece[variant]["cpu_s"] >= 0
    assert "| registration loss (warp + NCC + grad-L2), forward + backward |" in text
