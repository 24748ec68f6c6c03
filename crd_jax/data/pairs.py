"""Which subjects are registered to which: training and evaluation pairs, and pairs files.

Training pairs are a pure function of ``(seed, step, slot)``: the same run always sees the same pairs in
the same order, a resumed run continues the sequence exactly, and each host can compute its own slots of
the global batch without coordination. A pairs file (:func:`read_pairs_file`) lists ``fixed,moving`` pairs,
in that order for every command.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from typing import List, Optional, Sequence, Tuple

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from crd_jax.data.io import PathLike

import numpy as np

Pair = Tuple[int, int]  # (moving, fixed)


def train_pair(seed: int, step: int, slot: int, n: int, atlas: Optional[int] = None, group_size: Optional[int] = None) -> Pair:
    """A uniformly random ordered pair ``moving != fixed`` for batch slot ``slot`` of ``step``.

    Subject-to-subject (the paper's strategy, Section IV-B-1) unless ``atlas`` fixes the fixed image.
    ``group_size``: items come in consecutive groups (e.g. the same slice of every subject) and a pair
    never crosses groups; ``atlas`` is then an index within the group.
    """
    if group_size:
        if n % group_size:
            raise ValueError(f"{n} items do not form groups of {group_size}")
        rng = np.random.default_rng([seed, step, slot, 1])
        group = int(rng.integers(n // group_size))
        m, f = train_pair(seed, step, slot, group_size, atlas)
        return group * group_size + m, group * group_size + f
    if n < 2:
        raise ValueError("pair sampling needs at least two subjects")
    rng = np.random.default_rng([seed, step, slot])
    if atlas is not None:
        moving = int(rng.integers(n - 1))
        return (moving + (moving >= atlas), atlas)
    moving = int(rng.integers(n))
    fixed = int(rng.integers(n - 1))
    return moving, fixed + (fixed >= moving)


def eval_pairs(n: int, mode: str = "all", atlas: Optional[int] = None, group_size: Optional[int] = None) -> List[Pair]:
    """Deterministic evaluation pairs: ``all`` ordered pairs (n(n-1)), ``consecutive`` (moving i+1 to
    fixed i, the neurite-OASIS test protocol), or every subject to the ``atlas``; within each group of
    ``group_size`` consecutive items when given."""
    if group_size:
        within = eval_pairs(group_size, mode, atlas)
        return [(g * group_size + m, g * group_size + f) for g in range(n // group_size) for m, f in within]
    if atlas is not None:
        return [(i, atlas) for i in range(n) if i != atlas]
    if mode == "all":
        return [(m, f) for f in range(n) for m in range(n) if m != f]
    if mode == "consecutive":
        return [(i + 1, i) for i in range(n - 1)]
    raise ValueError(f"unknown evaluation pairing {mode!r} (all, consecutive)")


# --- pairs files: what ``crd-jax register --pairs`` and ``crd-jax evaluate --pairs`` read ------------------------

#: the columns of register's pairs file, in the order a file without a header row gives them (``fixed_seg`` last:
#: files of 2 to 4 columns written before it existed keep their meaning)
PAIR_COLUMNS = ("fixed", "moving", "moving_seg", "name", "fixed_seg")
#: a first cell naming one of these marks a header row, whichever command reads the file
_HEADER_MARKS = ("fixed", "moving", "moving_seg", "name")


@dataclasses.dataclass(frozen=True)
class PairRow:
    """One row of a pairs file: the fixed and moving entries (paths, or subject ids for ``evaluate``), the
    optional moving label map and output folder name, the row's number (data rows, from 1) and the optional
    fixed label map (``register``: the Dice of the warped labels with it)."""

    fixed: str
    moving: str
    moving_seg: Optional[str]
    name: Optional[str]
    row: int
    fixed_seg: Optional[str] = None


def read_pairs_file(path: PathLike, columns: Sequence[str] = PAIR_COLUMNS) -> List[PairRow]:
    """The rows of a pairs file (CSV, UTF-8 with or without a byte-order mark; blank rows and rows starting
    with ``#`` skipped). A file without a header row gives ``fixed,moving[,...]`` in the order of ``columns``
    (the command's own: ``fixed,moving,moving_seg,name,fixed_seg`` for ``register``, ``fixed,moving`` for ``evaluate``);
    a first row that names the columns (``fixed``, ``moving`` and any others of ``columns``) may give them in
    any order, e.g. ``moving,fixed``. Anything else is one :class:`~crd_jax.errors.InputError` line naming the
    file and the row."""
    from crd_jax.data.io import check_input_file
    from crd_jax.errors import InputError

    csv_path = check_input_file(path, "a CSV file")
    try:
        text = csv_path.read_text(encoding="utf-8-sig")  # a BOM (spreadsheet exports) is not part of a cell
        rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r) and not r[0].lstrip().startswith("#")]
    except OSError as exc:
        raise InputError(csv_path, f"unreadable ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise InputError(csv_path, f"not a text file in UTF-8 (byte {exc.start})") from None
    except csv.Error as exc:
        raise InputError(csv_path, f"not a CSV file ({' '.join(str(exc).split())})") from None
    expected = "'" + ",".join(columns[:2]) + "".join(f"[,{c}" for c in columns[2:]) + "]" * (len(columns) - 2) + "'"
    order = list(columns)
    header = [c.strip().lower() for c in rows[0]] if rows else []
    if header and (header[0] in _HEADER_MARKS or header[0] in columns):
        unknown = [c for c in header if c not in columns]
        if unknown or len(set(header)) != len(header) or not {"fixed", "moving"} <= set(header):
            raise InputError(
                csv_path,
                f"header row {','.join(rows[0])!r}: expected the column names fixed and moving "
                f"(and {', '.join(columns[2:]) or 'nothing else'}), each once, in any order",
            )
        order, rows = header, rows[1:]
    if not rows:
        raise InputError(csv_path, f"no pairs (expected rows {expected})")
    out = []
    for i, row in enumerate(rows, 1):
        cells = [c.strip() for c in row]
        if len(cells) < 2 or len(cells) > len(order):
            raise InputError(
                csv_path, f"row {i}: expected {expected if order == list(columns) else ','.join(order)}, got {','.join(row)!r}"
            )
        value = dict(zip(order, cells))
        if not value.get("fixed") or not value.get("moving"):
            raise InputError(csv_path, f"row {i}: the fixed and the moving entries must not be empty, got {','.join(row)!r}")
        out.append(
            PairRow(
                value["fixed"],
                value["moving"],
                value.get("moving_seg") or None,
                value.get("name") or None,
                i,
                value.get("fixed_seg") or None,
            )
        )
    return out
