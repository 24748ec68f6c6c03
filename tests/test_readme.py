"""The README's figures are the results files the project regenerates, never typed by hand."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import readme_tables  # noqa: E402


def test_every_readme_results_block_equals_its_results_file():
    text = (ROOT / "README.md").read_text()
    found = readme_tables.blocks(text)
    assert {"default_run", "efficiency", "peers", "reproduce_2d"} <= {name for name, _ in found}
    for name, body in found:
        assert body == readme_tables.result_text(name), f"README block '{name}' differs from benchmarks/results/{name}.md"


def test_the_check_catches_a_changed_figure(tmp_path):
    (tmp_path / "t.md").write_text("| VM-L | 0.606 |\n")
    text = "before\n<!-- results: t -->\n| VM-L | 0.619 |\n<!-- /results -->\nafter\n"
    fresh = readme_tables.render(text, tmp_path)
    assert "0.606" in fresh and "0.619" not in fresh and fresh.startswith("before\n") and fresh.endswith("after\n")
    assert readme_tables.blocks(fresh)[0][1] != readme_tables.blocks(text)[0][1]
