"""Datasets: indexable collections of preprocessed subjects, from files or generated.

Both kinds expose the same small interface that the pair loader and the evaluator use:
``len(ds)``, ``ds.ids``, ``ds.shape`` (canvas shape), ``ds.image(i)`` ``(*shape)`` float32,
``ds.labels(i)`` ``(*shape)`` int32 or None, ``ds.has_labels``, ``ds.placement`` and ``ds.volume(i)``
(the source :class:`~crd_jax.data.io.Volume`, for geometry).
"""

from __future__ import annotations

import collections
import threading
from typing import List, Optional, Sequence

import numpy as np

from crd_jax.data.io import Volume, load_image, load_labels
from crd_jax.data.layouts import Subject
from crd_jax.data.preprocess import Placement, Preprocessor
from crd_jax.errors import InputError


class _LRU:
    """A small thread-safe LRU cache (the loader thread and the evaluator may share a dataset)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: "collections.OrderedDict" = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, make):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return value


class VolumeDataset:
    """Subjects stored as files, preprocessed on first use and kept in an LRU cache.

    Every subject must share the stored shape of the first one (and its label map must match its image):
    a mismatch raises :class:`InputError` naming the file.
    """

    def __init__(self, subjects: Sequence[Subject], preprocessor: Preprocessor, ndim: int = 3, cache_size: int = 64):
        if not subjects:
            raise InputError("dataset", "no subjects")
        self.subjects: List[Subject] = list(subjects)
        self.preprocessor = preprocessor
        self.ndim = ndim
        self._cache = _LRU(cache_size)
        first = load_image(self.subjects[0].image, ndim)
        self._stored_shape = first.data.shape
        self.placement: Placement = preprocessor.placement(self._stored_shape)
        self.shape = self.placement.canvas_shape

    def __len__(self) -> int:
        return len(self.subjects)

    @property
    def ids(self) -> List[str]:
        return [s.id for s in self.subjects]

    @property
    def has_labels(self) -> bool:
        return all(s.labels is not None for s in self.subjects)

    def volume(self, i: int) -> Volume:
        vol = load_image(self.subjects[i].image, self.ndim)
        if vol.data.shape != self._stored_shape:
            raise InputError(
                vol.path, f"shape {vol.data.shape} differs from the dataset's {self._stored_shape} ({self.subjects[0].image})"
            )
        return vol

    def image(self, i: int) -> np.ndarray:
        return self._cache.get(("image", i), lambda: self.preprocessor.image(self.volume(i).data))

    def labels(self, i: int) -> Optional[np.ndarray]:
        path = self.subjects[i].labels
        if path is None:
            return None

        def make():
            lab = load_labels(path, self.ndim)
            if lab.data.shape != self._stored_shape:
                raise InputError(path, f"label map shape {lab.data.shape} differs from its image's {self._stored_shape}")
            return self.preprocessor.labels(lab.data)

        return self._cache.get(("labels", i), make)

    def validate(self) -> None:
        """Reads every file once, so that bad input fails before training rather than hours into it."""
        for i in range(len(self)):
            self.image(i)
            self.labels(i)
