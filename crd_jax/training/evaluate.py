"""Moved to :mod:`crd_jax.evaluation` (the CLI and the pipeline share it); kept so that forks importing it work."""

from crd_jax.evaluation import count_parameters, evaluate_pairs, measure_inference, predictor, summarize  # noqa: F401
