"""Moved to :func:`crd_jax.losses.registration_loss` (eq. 3, 4, 5, 7); kept for code importing it from here."""

from crd_jax.losses import registration_loss  # noqa: F401
