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


class SliceDataset:
    """2-D slices of a 3-D dataset: slice ``z`` of every subject for ``z`` in ``range(start, stop)`` along
    ``axis`` (indices of the stored volumes). Items are grouped by slice (``group_size`` = number of
    subjects), so training and evaluation pairs join the same slice of two subjects."""

    def __init__(self, volumes: VolumeDataset, axis: int, start: int, stop: int):
        if not 0 <= axis < 3:
            raise InputError(f"slice axis {axis}", "must be 0, 1 or 2")
        size = volumes.placement.source_shape[axis]
        if not 0 <= start < stop <= size:
            raise InputError(f"slice range {start}:{stop}", f"outside the volumes' {size} slices along axis {axis}")
        self.volumes = volumes
        self.axis = axis
        self.slices = list(range(start, stop))
        self.group_size = len(volumes)
        keep = [a for a in range(3) if a != axis]
        p = volumes.placement
        self._offset = p.offset[axis]
        self.placement = Placement(
            tuple(p.source_shape[a] for a in keep), tuple(p.canvas_shape[a] for a in keep), tuple(p.offset[a] for a in keep)
        )
        self.shape = self.placement.canvas_shape
        self.ndim = 2
        self._keep = keep

    def __len__(self) -> int:
        return len(self.slices) * self.group_size

    def _where(self, i: int):
        s, j = divmod(i, self.group_size)
        return j, self.slices[s] + self._offset

    @property
    def ids(self) -> List[str]:
        return [f"{sid}@{z}" for z in self.slices for sid in self.volumes.ids]

    @property
    def has_labels(self) -> bool:
        return self.volumes.has_labels

    def image(self, i: int) -> np.ndarray:
        j, z = self._where(i)
        return np.take(self.volumes.image(j), z, axis=self.axis)

    def labels(self, i: int) -> Optional[np.ndarray]:
        j, z = self._where(i)
        labels = self.volumes.labels(j)
        return None if labels is None else np.take(labels, z, axis=self.axis)

    def volume(self, i: int) -> Volume:
        j, _ = self._where(i)
        vol = self.volumes.volume(j)
        affine = np.eye(4)
        affine[:3, :2] = vol.affine[:3, self._keep]
        return Volume(self.image(i), affine, None, vol.path)

    def validate(self) -> None:
        self.volumes.validate()
