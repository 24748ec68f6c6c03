"""The figures' drawing, moved to :mod:`crd_jax.drawing` (the library draws ``register --qc``'s figures without
the command line); these names stay importable from here."""

from crd_jax.drawing import (
    PLANES,
    _slices,
    display_spacing,
    draw_pair,
    draw_saved,
    pair_figure,
    saved_registration,
    to_display,
)

__all__ = ["PLANES", "_slices", "display_spacing", "draw_pair", "draw_saved", "pair_figure", "saved_registration", "to_display"]
