"""S3's frozen teacher evaluated once per training pair instead of once per step.

In stage S3 (Section III-C) the teacher is frozen and deterministic, and without augmentation a training pair
is the same two volumes every time it is drawn, so phi^T and F^T (eq. 8-9) of a pair never change. A stage
draws its pairs from at most ``n (n - 1)`` ordered pairs of ``n`` subjects (552 for LPBA40's 24), while it
trains for thousands of steps: at 128^3 with n = 2 the teacher's forward is more than half of an S3 step
(``benchmarks/train_budget.py``), so evaluating it once per pair and keeping its outputs in host memory
removes most of that cost once every pair has been seen.

The cache is filled lazily by the loader's background thread (the first time a pair is drawn) and lives for
the process: a resumed stage refills it. It is used only when it is exact and fits:

* the stage's moving images are not augmented (a random deformation makes every draw a new pair);
* every pair the stage can draw fits in ``config.train.teacher_cache_gb`` of host memory (0 turns it off).

Stages sharing one teacher (the arms and streams of an experiment) share one cache.
"""

from __future__ import annotations

import threading
from typing import Dict, Optional, Tuple

import jax
import numpy as np

from crd_jax.data.loader import prefetched
from crd_jax.training.distill import DistillLoss, cached_key


def distinct_pairs(n: int, atlas: Optional[int] = None, group_size: Optional[int] = None) -> int:
    """How many ordered training pairs :func:`crd_jax.data.pairs.train_pair` can draw from ``n`` items."""
    if group_size:
        return (n // group_size) * distinct_pairs(group_size, atlas)
    return n - 1 if atlas is not None else n * (n - 1)


class TeacherCache:
    """The teacher's output leaves for each ordered pair ``(moving, fixed)``, computed on first use.

    ``apply(frozen, moving, fixed)`` is the teacher's forward; its output's tree structure is
    :attr:`tree` and each cached leaf has a leading batch axis of one.
    """

    def __init__(self, apply, frozen, example_moving, example_fixed):
        shapes = jax.eval_shape(apply, frozen, example_moving[:1], example_fixed[:1])
        self.tree = jax.tree_util.tree_structure(shapes)
        self.pair_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shapes))
        self._forward = jax.jit(lambda frozen, m, f: jax.tree_util.tree_leaves(apply(frozen, m, f)))
        self._frozen = frozen
        self._outputs: Dict[Tuple[int, int], list] = {}
        self._lock = threading.Lock()
        self.computed = 0  # teacher forwards run (one per distinct pair)

    def __len__(self) -> int:
        return len(self._outputs)

    def leaves(self, pair: Tuple[int, int], moving: np.ndarray, fixed: np.ndarray) -> list:
        """The teacher's output leaves for ``pair`` (images ``(1, *shape, 1)``), from the cache or computed."""
        with self._lock:
            hit = self._outputs.get(pair)
        if hit is not None:
            return hit
        leaves = [np.asarray(x) for x in jax.device_get(self._forward(self._frozen, moving, fixed))]
        with self._lock:
            self._outputs.setdefault(pair, leaves)
            self.computed += 1
        return leaves


class CachedTeacherLoader:
    """A :class:`~crd_jax.data.loader.PairLoader` whose batches also carry the teacher's outputs
    (``batch[cached_key(i)]``, stacked over the batch's slots)."""

    def __init__(self, loader, cache: TeacherCache):
        self.loader, self.cache = loader, cache

    def batch(self, step: int) -> Dict[str, np.ndarray]:
        batch = self.loader.batch(step)
        per_slot = [self.cache.leaves(pair, batch["moving"][i:i + 1], batch["fixed"][i:i + 1])
                    for i, pair in enumerate(self.loader.pairs(step))]
        for i in range(self.cache.tree.num_leaves):
            batch[cached_key(i)] = np.concatenate([leaves[i] for leaves in per_slot])
        return batch

    def iterate(self, start: int, stop: int, prefetch: int = 2):
        return prefetched(self.batch, start, stop, prefetch)


def attach(loss_fn, frozen, loader, example, budget_gb: float, caches: Dict[tuple, TeacherCache]):
    """``(loss_fn, loader, why)``: the stage's loss and loader reading the teacher from a cache when that is
    exact and fits ``budget_gb`` (see the module's docstring), else unchanged; ``why`` is one line for the log.
    ``caches`` holds the run's caches by teacher (stages with the same teacher and parameters share one)."""
    if not isinstance(loss_fn, DistillLoss) or loss_fn.teacher_tree is not None:
        return loss_fn, loader, None
    if budget_gb <= 0:
        return loss_fn, loader, "teacher cache off (train.teacher_cache_gb = 0): the teacher runs every step"
    if loader.augment.active:
        return loss_fn, loader, "teacher cache off: augmented pairs differ at every draw"
    key = (id(frozen), id(loss_fn.teacher))  # one teacher stage's model and parameters (alive in the run)
    cache = caches.get(key)
    if cache is None:
        cache = TeacherCache(loss_fn.teacher.apply, frozen, example["moving"], example["fixed"])
    n = distinct_pairs(len(loader.dataset), loader.atlas, getattr(loader.dataset, "group_size", None))
    need = n * cache.pair_bytes / 2**30
    if need > budget_gb:
        return loss_fn, loader, (f"teacher cache off: {n} pairs x {cache.pair_bytes / 2**20:.1f} MB = {need:.1f} GB "
                                 f"> train.teacher_cache_gb = {budget_gb:g}")
    caches[key] = cache
    why = (f"teacher cache on: the frozen teacher runs once per pair ({n} pairs x {cache.pair_bytes / 2**20:.1f} MB "
           f"<= {need:.2f} GB of host memory; {len(cache)} already computed)")
    return loss_fn.with_cached_teacher(cache.tree), CachedTeacherLoader(loader, cache), why
