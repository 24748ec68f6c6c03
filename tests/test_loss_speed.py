"""benchmarks/loss_speed.py runs end to end in a fresh process (--quick: 32^3, two rounds) and writes its table."""

from benchmark_runs import run_benchmark


import pytest


@pytest.mark.parametrize(
    "compare,differs",
    [
        ("loss", {"ncc", "warp", "grad_l2"}),
        ("upsample", {"upsample"}),
        ("coarse_grad_l2", {"grad_l2_coarse"}),
        ("coarse_mse", {"mse_coarse"}),
    ],
)
def test_quick_run_times_every_piece_before_and_after(tmp_path, compare, differs):
    # the same pieces either way, and the knobs each comparison records differ where it says
    payload, text = run_benchmark("loss_speed.py", tmp_path / "loss", "--quick", "--compare", compare)
    assert payload["shape"] == [32, 32, 32] and payload["steps"] == []
    assert len(payload["pieces"]) == 11
    for piece in payload["pieces"].values():
        for variant in ("before", "after"):
            assert piece[variant]["wall_s"] > 0 and piece[variant]["cpu_s"] >= 0
    before, after = payload["formulations"]["before"], payload["formulations"]["after"]
    assert {k for k in before if before[k] != after[k]} == differs and set(after.values()) == {"native", True}
    assert "| registration loss (warp + NCC + grad-L2), forward + backward |" in text
    assert ("`python benchmarks/loss_speed.py --compare upsample`" in text) == (compare == "upsample")
    assert "| grad-L2 of the upsampled coarse field, forward + backward |" in text
    assert "| eq. 8 on the full grid of two upsampled coarse fields, forward + backward |" in text
