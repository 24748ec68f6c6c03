"""The command line's layout: one module per subcommand, the pairs file read one way by every command, the
registration package free of the command line, and ``crd-jax build-kernel`` wired to the kernel's build."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from crd_jax.data.pairs import read_pairs_file
from crd_jax.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def test_nothing_outside_the_cli_imports_it():
    """``crd_jax.registration`` (and every other library module) is usable without the command line; only
    ``python -m crd_jax`` (``__main__.py``) starts it."""
    for path in (ROOT / "crd_jax").rglob("*.py"):
        if "cli" in path.relative_to(ROOT / "crd_jax").parts or path.name == "__main__.py":  # `python -m crd_jax`
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else ([a.name for a in node.names] if isinstance(node, ast.Import) else [])
            )
            assert not any(n == "crd_jax.cli" or n.startswith("crd_jax.cli.") for n in names), path


@pytest.mark.parametrize(
    "text",
    [
        "fixed,moving\nF1,M1\nF2,M2\n",
        "moving,fixed\nM1,F1\nM2,F2\n",
        "\ufeffmoving,fixed\nM1,F1\nM2,F2\n",  # a spreadsheet's byte-order mark
        "F1,M1\n# a comment\n\nF2,M2\n",  # no header: fixed,moving
        "\ufeffF1,M1\r\nF2,M2\r\n",
        " Moving , FIXED \n M1 , F1 \nM2,F2\n",
    ],
)
def test_a_pairs_file_reads_fixed_moving_with_or_without_a_header_in_either_order(tmp_path, text):
    path = tmp_path / "pairs.csv"
    path.write_bytes(text.encode("utf-8"))
    rows = read_pairs_file(path, columns=("fixed", "moving"))
    assert [(r.fixed, r.moving) for r in rows] == [("F1", "M1"), ("F2", "M2")]


def test_a_pairs_header_with_every_column_in_another_order(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("name,moving_seg,moving,fixed\nfirst,S.nii.gz,M.nii.gz,F.nii.gz\n,,M2.nii.gz,F2.nii.gz\n")
    rows = read_pairs_file(path)
    assert [(r.fixed, r.moving, r.moving_seg, r.name, r.row) for r in rows] == [
        ("F.nii.gz", "M.nii.gz", "S.nii.gz", "first", 1),
        ("F2.nii.gz", "M2.nii.gz", None, None, 2),
    ]


@pytest.mark.parametrize(
    "text,problem",
    [
        ("fixed,moving,fixed\na,b\n", "header row"),
        ("fixed,seg\na,b\n", "header row"),
        ("moving,fixed,moving_seg\nb,a\n", "header row"),  # evaluate's pairs file has no label column
        ("fixed,moving\n", "no pairs"),
        ("a\n", "row 1: expected 'fixed,moving'"),
        ("a,b,c\n", "row 1"),
        (",b\n", "row 1"),
    ],
)
def test_a_bad_pairs_file_is_one_line_naming_the_file(tmp_path, text, problem):
    path = tmp_path / "pairs.csv"
    path.write_text(text)
    with pytest.raises(InputError) as exc:
        read_pairs_file(path, columns=("fixed", "moving"))
    assert problem in str(exc.value) and "pairs.csv" in str(exc.value) and "\n" not in str(exc.value)


def test_register_and_evaluate_read_the_same_file_the_same_way(tmp_path):
    from crd_jax.cli.evaluate import read_pair_ids
    from crd_jax.cli.register import read_register_pairs

    (tmp_path / "pairs.csv").write_text("S01,S02\nS03,S01\n")  # fixed,moving
    assert [(Path(r.fixed).name, Path(r.moving).name, r.name) for r in read_register_pairs(tmp_path / "pairs.csv")] == [
        ("S01", "S02", "S02_to_S01"),
        ("S03", "S01", "S01_to_S03"),
    ]
    ids = ["S01", "S02", "S03"]
    (tmp_path / "pairs.csv").write_text("fixed,moving\nS01,S02\nS03,S01\n")  # evaluate needs the header (0.1.0's order)
    assert read_pair_ids(str(tmp_path / "pairs.csv"), ids) == [(1, 0), (0, 2)]  # (moving, fixed) indices
    (tmp_path / "pairs.csv").write_text("moving,fixed\nS02,S01\nS01,S03\n")  # the same pairs, named the other way
    assert read_pair_ids(str(tmp_path / "pairs.csv"), ids) == [(1, 0), (0, 2)]


def test_build_kernel_calls_the_kernels_rebuild(monkeypatch, capsys):
    from crd_jax.cli.main import main
    from crd_jax.ops import native_build

    calls = []
    monkeypatch.setattr(native_build, "rebuild", lambda force: calls.append(force) or "/some/where/_kernels.so")
    assert main(["build-kernel"]) == 0 and main(["build-kernel", "--force"]) == 0
    assert calls == [False, True] and "/some/where/_kernels.so" in capsys.readouterr().out


def test_build_kernel_help_runs_in_a_fresh_process():
    out = subprocess.run([sys.executable, "-m", "crd_jax", "build-kernel", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "example: crd-jax build-kernel --force" in out.stdout


def test_the_command_line_parses_without_loading_jax():
    """`crd-jax --help`, `models`, `--version` and argument errors must not pay for JAX, Flax and SciPy
    (seconds per call): building the whole parser, every subcommand's options included, imports none of them."""
    code = "import sys, crd_jax.cli.main as m; m.parser(); print(sorted({'jax', 'flax', 'scipy', 'optax'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
