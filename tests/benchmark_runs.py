"""Running a script of ``benchmarks/`` as a user does: a fresh process from the repository root, its table written
to ``OUT.json`` and ``OUT.md``."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """``python benchmarks/SCRIPT ARGS`` in a fresh process; fails the test with the end of its stderr unless it
    exits 0."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def run_benchmark(script: str, out: Path, *args: str, timeout: float = 900) -> tuple[dict, str]:
    """``python benchmarks/SCRIPT ARGS --out OUT``: the JSON payload and the Markdown table it wrote."""
    run_script(script, *args, "--out", str(out), timeout=timeout)
    return json.loads(out.with_suffix(".json").read_text()), out.with_suffix(".md").read_text()
