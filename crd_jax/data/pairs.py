"""Which subjects are registered to which.

Training pairs are a pure function of ``(seed, step, slot)``: the same run always sees the same pairs in
the same order, a resumed run continues the sequence exactly, and each host can compute its own slots of
the global batch without coordination.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

Pair = Tuple[int, int]  # (moving, fixed)


def train_pair(seed: int, step: int, slot: int, n: int, atlas: Optional[int] = None,
               group_size: Optional[int] = None) -> Pair:
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
