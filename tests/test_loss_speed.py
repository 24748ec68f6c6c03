"""benchmarks/loss_speed.py runs end to end in a fresh process (--quick: 32^3, two rounds) and writes its table."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_times_every_piece_before_and_after(tmp_path):
    out = tmp_path / "loss"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "loss_speed.py"), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads(out.with_suffix(".json").read_text())
    assert payload["shape"] == [32, 32, 32] and payload["steps"] == []
    assert len(payload["pieces"]) == 6
    for piece in payload["pieces"].values():
        for variant in ("before", "after"):
            assert piece[variant]["wall_s"] > 0 and piece[variant]["cpu_s"] >= 0
    text = out.with_suffix(".md").read_text()
    assert "| registration loss (warp + NCC + grad-L2), forward + backward |" in text
