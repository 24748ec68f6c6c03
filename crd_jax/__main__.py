"""``python -m crd_jax`` runs the ``crd-jax`` command."""

from crd_jax.cli.main import entry

entry()
