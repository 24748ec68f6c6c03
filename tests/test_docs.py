"""The documentation site builds without a warning, and its pages keep to what a reader outside this project
can use: no internal issue numbers, no paths outside the repository, model cards equal to the models."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.skipif(
    shutil.which("mkdocs") is None and not (Path(sys.executable).parent / "mkdocs").exists(),
    reason="mkdocs is not installed (pip install -e '.[docs]')",
)
def test_mkdocs_build_strict_passes(tmp_path):
    mkdocs = Path(sys.executable).parent / "mkdocs"
    exe = [str(mkdocs)] if mkdocs.exists() else ["mkdocs"]
    proc = subprocess.run(
        [*exe, "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file() and (tmp_path / "site" / "models" / "index.html").is_file()


def test_every_docs_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        assert f": {page.name}" in nav, f"docs/{page.name} is not in mkdocs.yml's nav"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_no_issue_numbers_and_no_paths_outside_the_repository(page):
    text = page.read_text()
    assert not re.search(r"\bissues? ?#?\d+", text, re.I), "internal issue number"
    for outside in ("../", "/work/", "/tmp/", "/root/", "shared/"):
        assert outside not in text, f"path outside the repository: {outside!r}"


def test_each_shipped_model_has_a_card_with_its_shipped_record():
    cards = (ROOT / "docs" / "models.md").read_text()
    folders = sorted((ROOT / "crd_jax" / "pretrained").glob("*/model.json"))
    assert folders
    for path in folders:
        name, spec = path.parent.name, json.loads(path.read_text())
        shipped = spec["shipped"]
        card = cards.split(f"## {name}\n", 1)[1].split("\n## ", 1)[0]
        assert f"**{shipped['val_dice_grid']:.4f}**" in card and f"**{shipped['val_dice_1mm']:.4f}**" in card, name
        assert shipped["trained_on"] in card and "x".join(map(str, shipped["grid"])) in card, name
        assert "Apache-2.0" in cards and "LPBA40" in card
