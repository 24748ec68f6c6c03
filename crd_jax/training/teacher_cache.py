"""S3's frozen teacher evaluated once per training pair instead of once per step.

In stage S3 (Section III-C) the teacher is frozen and deterministic, and without augmentation a training pair
is the same two volumes every time it is drawn, so phi^T and F^T (eq. 8-9) of a pair never change. A stage
draws its pairs from at most ``n (n - 1)`` ordered pairs of ``n`` subjects (552 for LPBA40's 24), while it
trains for thousands of steps: at 128^3 with n = 2 the teacher's forward is most of an S3 step
(``benchmarks/train_budget.py --teacher-cache``), so evaluating it once per pair removes most of that cost once
every pair has been seen.

The cache is filled lazily by the loader's background thread (the first time a pair is drawn). It is used only
when it is exact and fits:

* the stage's moving images are not augmented (a random deformation makes every draw a new pair);
* every pair the stage can draw fits in host memory (``config.train.teacher_cache_gb``), or else on disk
  (``config.train.teacher_cache_disk_gb``, single-process runs): ``.npy`` files in
  ``<workdir>/teacher_cache/<teacher stage>/`` that survive a restart, tied to the teacher's parameters and
  the training data by a fingerprint (a different one empties the folder). 0 turns either off.

Stages sharing one teacher (the arms and streams of an experiment) share one cache.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import jax
import numpy as np

from crd_jax.data.loader import prefetched
from crd_jax.training.distill import DistillLoss, cached_key, without_upsampled_disp

if TYPE_CHECKING:
    from crd_jax.data.loader import PairLoader
    from crd_jax.training.loop import LossFn
    from crd_jax.typing import Dataset, Params


def distinct_pairs(n: int, atlas: Optional[int] = None, group_size: Optional[int] = None) -> int:
    """How many ordered training pairs :func:`crd_jax.data.pairs.train_pair` can draw from ``n`` items."""
    if group_size:
        return (n // group_size) * distinct_pairs(group_size, atlas)
    return n - 1 if atlas is not None else n * (n - 1)


class MemoryStore:
    """Leaves by pair index in a dict."""

    where = "host memory"

    def __init__(self):
        self._items: Dict[int, list] = {}

    def __len__(self) -> int:
        return len(self._items)

    def get(self, index: int) -> Optional[list]:
        return self._items.get(index)

    def put(self, index: int, leaves: list) -> None:
        self._items[index] = leaves


class DiskStore:
    """Leaves by pair index in one ``leaf_<i>.npy`` per output leaf (``(slots, *shape)``, memory-mapped) and
    ``filled.npy`` (one byte per slot, set only after the slot's leaves are flushed, so a killed process
    leaves no half-written pair behind). ``meta.json`` holds the fingerprint; any other empties the folder."""

    where = "disk"

    def __init__(self, directory: Path, slots: int, shapes, fingerprint: str):
        self.directory = Path(directory)
        meta = {"fingerprint": fingerprint, "slots": slots, "leaves": [[list(s), str(d)] for s, d in shapes]}
        try:
            if json.loads((self.directory / "meta.json").read_text()) != meta:
                raise ValueError("another teacher or other data")
            self._open("r+", slots, shapes)
        except (OSError, ValueError):
            if self.directory.exists():
                shutil.rmtree(self.directory)  # this module's own files, for another teacher or other data
            self.directory.mkdir(parents=True)
            self._open("w+", slots, shapes)
            self._filled.flush()
            (self.directory / "meta.json").write_text(json.dumps(meta))  # last: the folder is complete

    def _open(self, mode: str, slots: int, shapes) -> None:
        open_ = np.lib.format.open_memmap
        self._leaves = [
            open_(self.directory / f"leaf_{i}.npy", mode=mode, dtype=d, shape=None if mode == "r+" else (slots, *s))
            for i, (s, d) in enumerate(shapes)
        ]
        self._filled = open_(self.directory / "filled.npy", mode=mode, dtype=np.uint8, shape=None if mode == "r+" else (slots,))
        expected = [((slots, *s), np.dtype(d)) for s, d in shapes] + [((slots,), np.dtype(np.uint8))]
        if [(tuple(a.shape), a.dtype) for a in (*self._leaves, self._filled)] != [(tuple(e), d) for e, d in expected]:
            raise ValueError("shapes or types differ from meta.json")

    def __len__(self) -> int:
        return int(self._filled.sum())

    def get(self, index: int) -> Optional[List[np.ndarray]]:
        if not self._filled[index]:
            return None
        return [np.array(leaf[index]) for leaf in self._leaves]

    def put(self, index: int, leaves: list) -> None:
        for store, leaf in zip(self._leaves, leaves):
            store[index] = leaf
            store.flush()
        self._filled[index] = 1
        self._filled.flush()


class TeacherCache:
    """The teacher's output leaves for each ordered pair ``(moving, fixed)`` of ``n`` subjects, computed on
    first use. ``apply(frozen, moving, fixed)`` is the teacher's forward; :attr:`tree` its output's structure;
    each leaf is stored without the batch axis."""

    def __init__(self, apply, frozen, example_moving, example_fixed):
        decided = []  # whether to leave out disp: decided once, at the first trace (the settings may change later)

        def outputs(frozen, m, f):  # a "half" FST's up(phi^T) is not stored: 8x phi^T's size at n = 2
            out, factor = without_upsampled_disp(apply(frozen, m, f), decided[0] > 0 if decided else None)
            if decided and factor != decided[0]:
                raise RuntimeError(f"teacher cache: the teacher's field is upsampled by {factor}, was {decided[0]}")
            decided[:1] = [factor]
            return out

        shapes = jax.eval_shape(outputs, frozen, example_moving[:1], example_fixed[:1])
        #: the stored outputs leave out ``disp = upsample_field(disp_low, disp_factor)`` (0: they hold it)
        self.disp_factor = decided[0]
        self.tree = jax.tree_util.tree_structure(shapes)
        self.shapes = [(x.shape[1:], np.dtype(x.dtype)) for x in jax.tree_util.tree_leaves(shapes)]
        self.pair_bytes = sum(int(np.prod(s)) * d.itemsize for s, d in self.shapes)
        self._forward = jax.jit(lambda frozen, m, f: jax.tree_util.tree_leaves(outputs(frozen, m, f)))
        self._frozen = frozen
        self.store = None
        self.n = 0
        self._lock = threading.Lock()
        self.computed = 0  # teacher forwards run in this process

    def open(self, store: Union[MemoryStore, DiskStore], n: int, pairs: int = 0) -> "TeacherCache":
        """Uses ``store`` for the pairs of ``n`` items (``pairs``: how many the stream can draw)."""
        self.store, self.n = store, n
        self.capacity_bytes = pairs * self.pair_bytes
        return self

    def __len__(self) -> int:
        return len(self.store)

    def compute(self, moving: np.ndarray, fixed: np.ndarray) -> list:
        """The teacher's output leaves as stored (``disp`` left out where :attr:`disp_factor` says), batch axis kept."""
        return jax.device_get(self._forward(self._frozen, moving, fixed))

    def leaves(self, pair: Tuple[int, int], moving: np.ndarray, fixed: np.ndarray) -> list:
        """The teacher's output leaves for ``pair`` (images ``(1, *shape, 1)``), each ``(1, ...)``."""
        index = pair[0] * self.n + pair[1]
        with self._lock:
            hit = self.store.get(index)
        if hit is None:
            hit = [np.asarray(x)[0] for x in self.compute(moving, fixed)]
            with self._lock:
                self.store.put(index, hit)
                self.computed += 1
        return [x[None] for x in hit]


def teacher_code() -> str:
    """What a teacher's forward pass runs besides its parameters: crd-jax's model and op sources (Python and
    native) and the JAX that executes them. A change of any re-fills a disk cache."""
    import jaxlib

    from crd_jax.compile import source_digest

    return hashlib.sha256(f"{source_digest('models', 'ops')} {jax.__version__} {jaxlib.__version__}".encode()).hexdigest()


def teacher_precision() -> str:
    """``"bf16 <engine>"`` where the teacher's convolutions round to bfloat16 (the process's bfloat16 inference is
    on and the CPU has an engine for it), else ``""`` (float32). S3 runs the teacher outside ``train.bf16``
    (:meth:`crd_jax.training.distill.DistillLoss.teacher_output`), so this is the only precision setting that
    changes what it outputs."""
    from crd_jax.ops import native
    from crd_jax.ops.conv import bf16_inference

    engine = native.bf16_engine() if bf16_inference() else ""
    return f"bf16 {engine}" if engine else ""


def fingerprint(teacher: object, frozen: Params, dataset: Dataset) -> str:
    """What a cached output depends on: the teacher's settings (its ``repr``: a dataclass or Flax module
    lists its fields), its parameters, the code that runs it (:func:`teacher_code`), the precision its
    convolutions run in (bfloat16 inference, :func:`crd_jax.ops.conv.bf16_inference`, with its engine, where it
    is on and the CPU has one; float32 runs keep the fingerprint they had before this was recorded) and the
    training volumes."""
    h = hashlib.sha256()
    h.update(repr(teacher).encode() + b"\0" + teacher_code().encode())
    if precision := teacher_precision():
        h.update(b"\0precision " + precision.encode())
    for leaf in jax.tree_util.tree_leaves(frozen):
        a = np.ascontiguousarray(jax.device_get(leaf))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    h.update(f"{len(dataset)}".encode())
    for i in range(len(dataset)):
        h.update(np.ascontiguousarray(dataset.image(i), np.float32).tobytes())
    return h.hexdigest()


def _allocated_bytes(directory: Path) -> int:
    """Disk space the files of a cache folder occupy (allocated blocks: its memory-mapped files are sparse until
    their pairs are written); 0 where there is no folder. Links are not followed (what they point to may lie on
    another disk than the one whose free space this is added to)."""
    directory = Path(directory)
    try:
        if directory.is_symlink():
            return 0
        return sum(f.lstat().st_blocks * 512 for f in directory.iterdir() if not f.is_symlink() and f.is_file())
    except OSError:
        return 0


def in_memory_bytes(caches: Mapping[tuple, "TeacherCache"]) -> int:
    """Host memory the run's memory caches may fill (every pair of each)."""
    return sum(c.capacity_bytes for c in caches.values() if isinstance(c.store, MemoryStore))


def release_unused(caches: Dict[tuple, "TeacherCache"], teachers_still_needed: Iterable[str]) -> None:
    """Drops the caches of teacher stages that no later stage distils from (their memory is freed)."""
    needed = set(teachers_still_needed)
    for key in [k for k in caches if k[0] not in needed]:
        del caches[key]


class CachedTeacherLoader:
    """A :class:`~crd_jax.data.loader.PairLoader` whose batches also carry the teacher's outputs
    (``batch[cached_key(i)]``, stacked over the batch's slots)."""

    def __init__(self, loader, cache: TeacherCache):
        self.loader, self.cache = loader, cache

    def batch(self, step: int) -> Dict[str, np.ndarray]:
        batch = self.loader.batch(step)
        per_slot = [
            self.cache.leaves(pair, batch["moving"][i : i + 1], batch["fixed"][i : i + 1])
            for i, pair in enumerate(self.loader.pairs(step))
        ]
        for i in range(self.cache.tree.num_leaves):
            batch[cached_key(i)] = np.concatenate([leaves[i] for leaves in per_slot])
        return batch

    def iterate(self, start: int, stop: int, prefetch: int = 2) -> Iterator[Tuple[int, Dict[str, np.ndarray]]]:
        return prefetched(self.batch, start, stop, prefetch)


def attach(
    loss_fn: LossFn,
    frozen: Params,
    loader: PairLoader,
    example: Mapping[str, np.ndarray],
    budget_gb: float,
    caches: Dict[tuple, TeacherCache],
    disk_gb: float = 0.0,
    directory: Optional[Path] = None,
    teacher_stage: str = "",
) -> Tuple[LossFn, Union[PairLoader, CachedTeacherLoader], Optional[str]]:
    """``(loss_fn, loader, why)``: the stage's loss and loader reading the teacher from a cache when that is
    exact and fits (in ``budget_gb`` of host memory over all the run's memory caches, else ``disk_gb`` under
    ``directory``; see the module's docstring), else unchanged; ``why`` is one line for the log (None for a
    stage without a teacher). ``caches`` holds the run's caches, keyed by the teacher stage's name and the
    teacher's settings, so stages distilling from one teacher share one (:func:`release_unused` drops them)."""
    if not isinstance(loss_fn, DistillLoss) or loss_fn.teacher_tree is not None:
        return loss_fn, loader, None
    if not budget_gb > 0 and not disk_gb > 0:
        return loss_fn, loader, "teacher cache off (train.teacher_cache_gb = 0): the teacher runs every step"
    if loader.augment.active:
        return loss_fn, loader, "teacher cache off: augmented pairs differ at every draw"
    description = repr(loss_fn.teacher)
    key = (teacher_stage, description)
    cache = caches.get(key)
    n_items = len(loader.dataset)
    pairs = distinct_pairs(n_items, loader.atlas, getattr(loader.dataset, "group_size", None))
    if cache is None:
        cache = TeacherCache(loss_fn.teacher.apply, frozen, example["moving"], example["fixed"])
        need = pairs * cache.pair_bytes / 2**30
        held = in_memory_bytes(caches) / 2**30
        size = f"{pairs} pairs x {cache.pair_bytes / 2**20:.1f} MB = {need:.2f} GB"
        if need + held <= budget_gb:
            cache.open(MemoryStore(), n_items, pairs)
        elif need <= disk_gb and directory is not None and jax.process_count() == 1:
            tag = hashlib.sha256(description.encode()).hexdigest()[:8]
            directory = Path(directory).with_name(f"{Path(directory).name}-{tag}")  # one folder per teacher setting
            directory.parent.mkdir(parents=True, exist_ok=True)
            # what the folder already holds counts as free: a resumed run reuses it (or empties it for another
            # teacher), so a disk that filled up since the cache was written does not switch the cache off
            free = (shutil.disk_usage(directory.parent).free + _allocated_bytes(directory)) / 2**30
            if need > free:
                return loss_fn, loader, f"teacher cache off: {size} > {free:.1f} GB free on the disk of {directory}"
            store = DiskStore(directory, n_items * n_items, cache.shapes, fingerprint(loss_fn.teacher, frozen, loader.dataset))
            cache.open(store, n_items, pairs)
        else:
            other = f" with {held:.2f} GB held by other teachers' caches" if held else ""
            disk = f" and > train.teacher_cache_disk_gb = {disk_gb:g}" if disk_gb > 0 else ""
            return loss_fn, loader, f"teacher cache off: {size}{other} > train.teacher_cache_gb = {budget_gb:g}{disk}"
        caches[key] = cache
    why = (
        f"teacher cache on: the frozen teacher runs once per pair ({pairs} pairs x "
        f"{cache.pair_bytes / 2**20:.1f} MB in {cache.store.where}; {len(cache)} already computed)"
    )
    return loss_fn.with_cached_teacher(cache.tree, cache.disp_factor), CachedTeacherLoader(loader, cache), why
