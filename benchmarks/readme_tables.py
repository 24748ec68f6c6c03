"""Keeps every figure in the README and the docs equal to the results file that produced it.

README.md and every page under docs/ hold each table between ``<!-- results: NAME -->`` and
``<!-- /results -->``; NAME is a file under ``benchmarks/results/`` (``NAME.md``). This script rewrites those
blocks from the files:

    python benchmarks/readme_tables.py                        # README and docs blocks <- results files
    python benchmarks/readme_tables.py --check                # exit 1 if any block differs (what the test does)
    python benchmarks/readme_tables.py --collect-default-run runs/synthetic_vm   # after `python train.py`

``--collect-default-run`` copies a finished default run's ``results.md``/``results.json`` to
``benchmarks/results/default_run.{md,json}`` first, with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
README = ROOT / "README.md"
DOCS = ROOT / "docs"
BLOCK = re.compile(r"(<!-- results: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


def pages(root: Path = ROOT) -> list:
    """The files whose results blocks this script keeps: README.md and docs/*.md (sorted)."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def blocks(text: str):
    """``[(name, body)]`` of every results block in ``text``."""
    return [(m.group("name"), m.group("body")) for m in BLOCK.finditer(text)]


def result_text(name: str, results: Path = RESULTS) -> str:
    path = results / f"{name}.md"
    if not path.exists():
        raise SystemExit(f"error: {path}: no such results file (named by a README or docs block)")
    text = path.read_text()
    return text if text.endswith("\n") else text + "\n"


def render(text: str, results: Path = RESULTS) -> str:
    return BLOCK.sub(lambda m: m.group(1) + result_text(m.group("name"), results) + m.group(4), text)


def collect_default_run(workdir: Path) -> None:
    sys.path.insert(0, str(HERE))
    from common import machine

    table = (workdir / "results.md").read_text()
    rows = json.loads((workdir / "results.json").read_text())
    m = machine()
    note = (
        f"\n`python train.py` ({workdir.name}), {m.get('cpu', 'CPU')}, {m.get('cpus', '?')} cores; "
        "regenerate with `python benchmarks/readme_tables.py --collect-default-run runs/synthetic_vm`.\n"
    )
    (RESULTS / "default_run.md").write_text(table.rstrip("\n") + "\n" + note)
    (RESULTS / "default_run.json").write_text(json.dumps({"machine": m, "results": rows}, indent=2) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true")
    p.add_argument("--collect-default-run", type=Path, metavar="WORKDIR")
    args = p.parse_args()
    if args.collect_default_run:
        collect_default_run(args.collect_default_run)
    stale, written = [], 0
    for page in pages():
        text = page.read_text()
        new = render(text)
        if args.check:
            where = page.relative_to(ROOT)
            stale += [f"{where}: {name}" for (name, body), (_, fresh) in zip(blocks(text), blocks(new)) if body != fresh]
            continue
        if new != text:
            page.write_text(new)
        written += len(blocks(new))
    if args.check:
        if stale:
            print(f"results blocks differ from their results files: {', '.join(stale)}", file=sys.stderr)
            return 1
        return 0
    print(f"README and docs: {written} results blocks written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
