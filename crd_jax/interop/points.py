"""Points files for ``crd-jax apply --points``: one CSV format, read and written alike.

A header row names the columns; ``x``, ``y`` and ``z`` (any case, any position) are world coordinates in
millimetres, RAS by default (NIfTI's, nibabel's, FreeSurfer's scanner RAS) or LPS with ``lps=True`` (ITK's and
ANTs' convention: ``antsApplyTransformsToPoints`` reads and writes ``x,y,z,t,label,comment`` in LPS, x and y
negated). Other columns are carried through unchanged, in their order. A file without a header holds exactly
three numbers per row (x, y, z). ``#`` lines and blank lines are skipped; a BOM and CRLF line ends are read.
What :func:`points_csv` writes, :func:`read_points` reads back.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from typing import TYPE_CHECKING, List, Optional

import numpy as np

from crd_jax.errors import InputError

if TYPE_CHECKING:
    from crd_jax.data.io import PathLike

LPS_FLIP = np.array([-1.0, -1.0, 1.0])


@dataclasses.dataclass
class PointsTable:
    """The points (``(N, 3)`` float64, RAS mm) and the file's other columns, to be written back around them."""

    xyz: np.ndarray
    header: List[str]
    rows: List[List[str]]  # every cell as read; the x, y, z cells are replaced when written
    columns: tuple  # indices of x, y, z in a row


def _number(cell: str) -> Optional[float]:
    try:
        return float(cell)
    except ValueError:
        return None


def read_points(path: PathLike, lps: bool = False) -> PointsTable:
    """A points CSV (module docstring) as a :class:`PointsTable` in RAS; any problem is one
    :class:`InputError` line naming the file and the line."""
    from crd_jax.data.io import check_input_file

    check_input_file(path, "a CSV of points")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except OSError as exc:
        raise InputError(path, f"unreadable ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise InputError(path, f"not a text file in UTF-8 (byte {exc.start})") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip() and not line.lstrip().startswith("#")]
    try:
        table = [(n, next(csv.reader([line]))) for n, line in lines]
    except csv.Error as exc:
        raise InputError(path, f"not a CSV of points ({exc})") from None
    if not table:
        raise InputError(path, "no points")
    first = [c.strip() for c in table[0][1]]
    if all(_number(c) is None for c in first) and any(c.lower() in ("x", "y", "z") for c in first):
        header, body = first, table[1:]
        lower = [c.lower() for c in header]
        missing = [k for k in ("x", "y", "z") if k not in lower]
        if missing:
            raise InputError(
                path,
                f"line {table[0][0]}: the header has no column {', '.join(missing)} "
                "(expected x,y,z, any order, other columns allowed)",
            )
        columns = tuple(lower.index(k) for k in ("x", "y", "z"))
    else:
        header, body, columns = ["x", "y", "z"], table, (0, 1, 2)
    rows, xyz = [], []
    for n, cells in body:
        cells = [c.strip() for c in cells]
        shown = ",".join(cells)[:60]
        if len(cells) != len(header):
            raise InputError(path, f"line {n}: expected {len(header)} values ({','.join(header)}), got {shown!r}")
        values = [_number(cells[c]) for c in columns]
        if any(v is None for v in values):
            raise InputError(path, f"line {n}: expected x,y,z numbers, got {shown!r}")
        if not np.all(np.isfinite(values)):
            raise InputError(path, f"line {n}: expected 3 finite numbers (x, y, z in mm), got {shown!r}")
        rows.append(cells)
        xyz.append(values)
    if not rows:
        raise InputError(path, "no points")
    points = np.asarray(xyz, np.float64)
    return PointsTable(points * LPS_FLIP if lps else points, header, rows, columns)


def points_csv(table: PointsTable, moved: np.ndarray, lps: bool = False) -> str:
    """The CSV text of ``table`` with its points replaced by ``moved`` (RAS; written in LPS with ``lps``)."""
    moved = np.asarray(moved, np.float64) * (LPS_FLIP if lps else 1.0)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(table.header)
    for cells, point in zip(table.rows, moved):
        cells = list(cells)
        for c, v in zip(table.columns, point):
            cells[c] = f"{v:.6f}"
        writer.writerow(cells)
    return out.getvalue()
