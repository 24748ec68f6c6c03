"""The ``crd-jax`` command (also ``python -m crd_jax``)."""
