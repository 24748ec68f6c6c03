"""Batches of training pairs, prepared ahead of the train step in a background thread.

A batch is ``{"moving": (B, *shape, 1), "fixed": (B, *shape, 1)}`` float32 numpy. With ``P`` processes
(multi-host), process ``p`` builds only slots ``p * B/P .. (p + 1) * B/P - 1`` of each global batch, and the
train step assembles the global array from the local pieces.
"""

from __future__ import annotations

import queue
import threading
from typing import Dict, Iterator, Optional, Tuple

import numpy as np

from crd_jax.data.pairs import train_pair


class PairLoader:
    def __init__(
        self,
        dataset,
        global_batch: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        atlas: Optional[int] = None,
    ):
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
        self.dataset = dataset
        self.global_batch = global_batch
        self.local_batch = global_batch // process_count
        self.seed = seed
        self.first_slot = process_index * self.local_batch
        self.atlas = atlas

    def pairs(self, step: int):
        return [
            train_pair(self.seed, step, slot, len(self.dataset), self.atlas, getattr(self.dataset, "group_size", None))
            for slot in range(self.first_slot, self.first_slot + self.local_batch)
        ]

    def batch(self, step: int) -> Dict[str, np.ndarray]:
        """This process's part of the batch of ``step`` (a pure function of ``step``)."""
        moving, fixed = [], []
        for m, f in self.pairs(step):
            moving.append(self.dataset.image(m))
            fixed.append(self.dataset.image(f))
        return {"moving": np.stack(moving)[..., None], "fixed": np.stack(fixed)[..., None]}

    def iterate(self, start: int, stop: int, prefetch: int = 2) -> Iterator[Tuple[int, Dict[str, np.ndarray]]]:
        """Yields ``(step, batch)`` for ``start <= step < stop``, loading up to ``prefetch`` batches ahead.

        An exception in the loader thread is re-raised in the consumer.
        """
        q: "queue.Queue" = queue.Queue(maxsize=max(1, prefetch))
        stop_event = threading.Event()

        def work():
            try:
                for step in range(start, stop):
                    item = (step, self.batch(step))
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
