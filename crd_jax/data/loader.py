"""Batches of training pairs, prepared ahead of the train step in a background thread.

A batch is ``{"moving": (B, *shape, 1), "fixed": (B, *shape, 1)}`` float32 numpy, plus
``{"moving_labels", "fixed_labels"}: (B, *shape)`` int32 label indices (0 background, ``i`` for the i-th of
``label_values``) when the loss needs them. With an :class:`~crd_jax.data.augment.Augment`, each moving
image (and its labels) goes through a random B-spline deformation drawn from ``(seed, step, slot)``. With ``P`` processes
(multi-host), process ``p`` builds only slots ``p * B/P .. (p + 1) * B/P - 1`` of each global batch, and the
train step assembles the global array from the local pieces.
"""

from __future__ import annotations

import copy
import queue
import threading
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from crd_jax.data.augment import Augment, deform
from crd_jax.data.pairs import Pair, train_pair


class PairLoader:
    def __init__(
        self,
        dataset,
        global_batch: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        atlas: Optional[int] = None,
        augment: Augment = Augment(),
        label_values: Optional[Sequence[int]] = None,
    ):
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
        self.dataset = dataset
        self.global_batch = global_batch
        self.local_batch = global_batch // process_count
        self.seed = seed
        self.first_slot = process_index * self.local_batch
        self.atlas = atlas
        self.augment = augment
        self.label_values = _sorted_values(label_values)

    def for_stage(
        self, seed_offset: int = 0, augment: Optional[Augment] = None, label_values: Optional[Sequence[int]] = None
    ) -> "PairLoader":
        """A loader over the same data with the stage's own pair stream (``seed + seed_offset``),
        augmentation and label indices."""
        other = copy.copy(self)
        other.seed = self.seed + int(seed_offset)
        other.augment = self.augment if augment is None else augment
        other.label_values = self.label_values if label_values is None else _sorted_values(label_values)
        return other

    def _label_index(self, i: int) -> np.ndarray:
        """Label map of subject ``i`` as indices into ``label_values`` (0 for anything else)."""
        raw = self.dataset.labels(i)
        if raw is None:
            raise ValueError(f"the label-supervised loss needs label maps, and subject {self.dataset.ids[i]} has none")
        values = self.label_values
        pos = np.clip(np.searchsorted(values, raw), 0, len(values) - 1)
        return np.where(values[pos] == raw, pos + 1, 0).astype(np.int32)

    def pairs(self, step: int) -> List[Pair]:
        return [
            train_pair(self.seed, step, slot, len(self.dataset), self.atlas, getattr(self.dataset, "group_size", None))
            for slot in range(self.first_slot, self.first_slot + self.local_batch)
        ]

    def batch(self, step: int) -> Dict[str, np.ndarray]:
        """This process's part of the batch of ``step`` (a pure function of ``step``)."""
        with_labels = self.label_values is not None
        out = {"moving": [], "fixed": [], "moving_labels": [], "fixed_labels": []}
        for slot, (m, f) in zip(range(self.first_slot, self.first_slot + self.local_batch), self.pairs(step)):
            image, labels = self.dataset.image(m), (self._label_index(m) if with_labels else None)
            if self.augment.active:
                image, labels = deform(np.random.default_rng([self.seed, step, slot, 2]), image, labels, self.augment)
            out["moving"].append(image)
            out["fixed"].append(self.dataset.image(f))
            if with_labels:
                out["moving_labels"].append(labels)
                out["fixed_labels"].append(self._label_index(f))
        batch = {"moving": np.stack(out["moving"])[..., None], "fixed": np.stack(out["fixed"])[..., None]}
        if with_labels:
            batch.update(moving_labels=np.stack(out["moving_labels"]), fixed_labels=np.stack(out["fixed_labels"]))
        return batch

    def iterate(self, start: int, stop: int, prefetch: int = 2) -> Iterator[Tuple[int, Dict[str, np.ndarray]]]:
        """Yields ``(step, batch)`` for ``start <= step < stop``, loading up to ``prefetch`` batches ahead."""
        return prefetched(self.batch, start, stop, prefetch)


def prefetched(
    batch: Callable[[int], Dict[str, np.ndarray]], start: int, stop: int, prefetch: int = 2
) -> Iterator[Tuple[int, Dict[str, np.ndarray]]]:
    """Yields ``(step, batch(step))`` for ``start <= step < stop``, computing up to ``prefetch`` batches ahead
    in a background thread. An exception in the thread is re-raised in the consumer.
    """
    q: "queue.Queue" = queue.Queue(maxsize=max(1, prefetch))
    stop_event = threading.Event()

    def work():
        try:
            for step in range(start, stop):
                item = (step, batch(step))
                while not stop_event.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop_event.is_set():
                    return
        except BaseException as exc:  # handed to the consumer
            q.put(exc)

    thread = threading.Thread(target=work, name="crd-jax-loader", daemon=True)
    thread.start()
    try:
        for _ in range(start, stop):
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop_event.set()


def _sorted_values(values: Optional[Sequence[int]]) -> Optional[np.ndarray]:
    return None if values is None else np.asarray(sorted(values), np.int64)
