"""Registering many pairs: what ``crd-jax register --pairs`` runs, in one process, in shards across a job array,
or on a Dask cluster.

A pairs file becomes :class:`Task`\\ s (one per row, numbered in file order); a run takes its shard of them
(:func:`select_shard`: row ``i`` belongs to shard ``i mod N``, so every pair is registered by exactly one
shard whatever the machines), checks every input's header before the first pair (:func:`validate`), skips
the pairs whose complete output set exists (``--skip-existing``; outputs land atomically, so a set is either
whole or absent, and a set of other options is redone) and registers the rest with one model loaded and
compiled once per process (:func:`run_serial`, or :func:`run_dask` on each Dask worker). Each pair's outcome
(:class:`Outcome`) is reported as it finishes; failed pairs (``--keep-going``) are listed in a CSV.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import re
import socket
import time
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from crd_jax.registration.model import LoadedModel
    import distributed

from crd_jax.errors import InputError

log = logging.getLogger("crd_jax.registration.batch")

#: exit status of ``register --pairs --keep-going`` when a pair failed (2 stays bad input before anything ran)
FAILED_STATUS = 1


@dataclasses.dataclass(frozen=True)
class Task:
    """One pair to register: its place in the pairs file (``index`` from 0, the shard key; ``row``, the data
    row's number from 1, for messages), its output folder name, its inputs and, in the Learn2Reg layout, its ids."""

    index: int
    row: int
    name: str
    fixed: str
    moving: str
    moving_seg: Optional[str] = None
    fixed_seg: Optional[str] = None
    pair_ids: Optional[Tuple[str, str]] = None
    overwrite: bool = False  # set by plan(): an incomplete earlier set is replaced


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every pair of a run shares (sent to each Dask worker): the model folder, the output root, what is
    written, the registration keywords and the options recorded in ``registration.json``."""

    model: str
    out_root: str
    written: object  # writing.OutputOptions
    kwargs: Mapping
    used: Mapping
    overwrite: bool = False
    skip_existing: bool = False
    flat_disp: bool = False  # Learn2Reg: displacements in out_root, not in each pair's folder
    bf16: bool = False


@dataclasses.dataclass
class Outcome:
    """What became of one pair: ``done``, ``skipped`` or ``failed`` (``reason``: one line)."""

    task: Task
    status: str
    seconds: float = 0.0
    folds: int = 0
    reason: str = ""
    warning: Optional[str] = None
    dice: Optional[float] = None
    pid: int = 0
    model_loads: int = 0  # how many times the process that registered it loaded a model (1: once per worker)

    def line(self) -> str:
        """The pair's line in the log."""
        t = self.task
        if self.status == "skipped":
            return f"{t.name}: skipped (complete outputs exist)"
        if self.status == "failed":
            return f"{t.name}: FAILED (row {t.row}): {self.reason}"
        text = f"{t.name}: {self.seconds:.2f} s, folds {self.folds}"
        text += f", Dice {self.dice:.4f}" if self.dice is not None else ""
        return text + (f"; warning: {self.warning}" if self.warning else "")


# --- which pairs ------------------------------------------------------------------------------------------------


def parse_shard(value: Optional[str], environ: Mapping[str, str] = os.environ) -> Tuple[int, int]:
    """``--shard K/N`` as ``(K, N)``; without it, a Slurm job array's task (``SLURM_ARRAY_TASK_ID`` minus
    ``SLURM_ARRAY_TASK_MIN``, of ``SLURM_ARRAY_TASK_COUNT``); else ``(0, 1)``."""
    if value is None:
        count = environ.get("SLURM_ARRAY_TASK_COUNT")
        if not count:
            return 0, 1
        source = "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT"
        try:
            k = int(environ["SLURM_ARRAY_TASK_ID"]) - int(environ.get("SLURM_ARRAY_TASK_MIN", "0"))
            n = int(count)
        except (KeyError, ValueError):
            raise InputError(source, "a job array's task id and count must be numbers; pass --shard K/N") from None
    else:
        source = "--shard"
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value)
        if not match:
            raise InputError(source, f"{value!r}: expected K/N, e.g. 0/4 (shard K of N, K from 0)")
        k, n = int(match.group(1)), int(match.group(2))
    if n < 1 or not 0 <= k < n:
        raise InputError(source, f"shard {k} of {n}: needs 0 <= K < N (K counts from 0)")
    return k, n


def select_shard(tasks: Sequence[Task], k: int, n: int) -> List[Task]:
    """Shard ``k`` of ``n``: the pairs whose file index ``i`` has ``i mod n == k`` (every pair in one shard)."""
    return [t for t in tasks if t.index % n == k]


def learn2reg_ids(fixed: str, moving: str, name: Optional[str]) -> Optional[Tuple[str, str]]:
    """A pair's Learn2Reg ids: a name column ``FFFF_MMMM`` (two digit runs), else the first run of digits in
    each file's name (``img0438.nii.gz``, ``OASIS_0438_0000.nii.gz`` -> ``0438``); ``None`` when a name has none."""
    if name and re.fullmatch(r"\d+_\d+", name):
        return tuple(name.split("_"))  # type: ignore[return-value]
    ids = [re.search(r"\d+", Path(p).name) for p in (fixed, moving)]
    return (ids[0].group(0), ids[1].group(0)) if all(ids) else None


# --- checks before the first pair ---------------------------------------------------------------------------------


def header_problem(path: str, ndim: int, key: str = "vol") -> Optional[InputError]:
    """What is wrong with an input file that its header already shows (``None``: nothing): missing, not a
    regular file, an unknown format, an unreadable header, a wrong rank, a degenerate size or voxel size, no
    orientation, more voxels than this machine takes. Reads the header only."""
    from crd_jax.data import io as dio

    try:
        dio.check_input_file(path)
        if path.endswith(".npz"):
            shape = _npz_shape(path, key)
        elif dio.is_nifti(path):
            header = _nifti_header(path)
            dio._claimed_bytes(header, path)
            dio._check_voxel_size(header, path)
            dio.check_orientation(header, path)
            shape = tuple(int(s) for s in header.get_data_shape())
        else:
            raise InputError(path, "unknown format (expected .nii, .nii.gz or .npz)")
    except InputError as exc:
        return exc
    while len(shape) > ndim and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != ndim:
        return InputError(path, f"shape {shape} ({len(shape)}-D), expected a {ndim}-D volume")
    if min(shape) < 2:
        return InputError(path, f"shape {shape} has an axis of fewer than 2 voxels")
    return None


def _nifti_header(path: str):
    from crd_jax.data import io as dio

    with open(path, "rb") as f:
        raw = f.read(1 << 16)
    if path.endswith(".gz"):
        try:
            raw = zlib.decompressobj(31).decompress(raw, 540)
        except zlib.error as exc:
            raise InputError(path, f"unreadable header (not a gzip stream: {exc})") from None
    header = dio._header_from_bytes(raw[:540])
    if header is None:
        raise InputError(path, "unreadable or truncated file (no NIfTI-1 or NIfTI-2 header)")
    if not path.endswith(".gz") and os.path.getsize(path) < dio._claimed_bytes(header, path):
        raise InputError(path, "truncated file: shorter than its header claims")
    return header


def _npz_shape(path: str, key: str) -> Tuple[int, ...]:
    import numpy as np

    try:
        with zipfile.ZipFile(path) as z, z.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            shape = np.lib.format._read_array_header(f, version)[0]
    except KeyError:
        raise InputError(path, f"no '{key}' array in the .npz") from None
    except Exception as exc:
        raise InputError(path, f"unreadable .npz ({type(exc).__name__}: {exc})") from None
    return tuple(int(s) for s in shape)


def validate(tasks: Iterable[Task], ndim: int) -> List[Tuple[Task, InputError]]:
    """Every input of every task checked by its header: ``(task, problem)`` for each bad row (its first bad file)."""
    bad = []
    for task in tasks:
        for path, key in ((task.fixed, "vol"), (task.moving, "vol"), (task.moving_seg, "seg"), (task.fixed_seg, "seg")):
            problem = path and header_problem(path, ndim, key)
            if problem:
                bad.append((task, problem))
                break
    return bad


# --- output sets --------------------------------------------------------------------------------------------------


def output_sets(task: Task, settings: Settings, overwrite: Optional[bool] = None) -> list:
    """The pair's :class:`~crd_jax.outputs.OutputSet`\\ s: its folder, and in the Learn2Reg layout its
    displacement files in the output root (constructing them checks the destinations)."""
    from crd_jax.outputs import OutputSet

    written = _written(task, settings)
    overwrite = settings.overwrite or task.overwrite if overwrite is None else overwrite
    with_seg = bool(task.moving_seg)
    root = Path(settings.out_root)
    sets = [OutputSet(root / task.name, written.names(with_seg, disp=not settings.flat_disp), overwrite, family=written.family())]
    if settings.flat_disp and "disp" in written.kinds(with_seg):
        sets.append(OutputSet(root, written.disp_names(), overwrite))
    return sets


def _written(task: Task, settings: Settings):
    return dataclasses.replace(settings.written, pair_ids=task.pair_ids) if task.pair_ids else settings.written


def complete(task: Task, settings: Settings) -> bool:
    """Whether every file the pair's output set holds exists (sets land whole, so this is "done")."""
    sets = output_sets(task, settings, overwrite=True)
    return all(p.is_file() for s in sets for p in s.paths())


def plan(tasks: Sequence[Task], settings: Settings) -> Tuple[List[Task], List[Task]]:
    """``(to_register, skipped)``: with ``skip_existing`` the complete pairs are skipped and an incomplete
    set is marked to be replaced; otherwise each destination is checked now (an existing output is refused
    before the first pair, unless ``overwrite``)."""
    run, skipped = [], []
    for task in tasks:
        if settings.skip_existing and complete(task, settings):
            skipped.append(task)
            continue
        if settings.skip_existing:
            task = dataclasses.replace(task, overwrite=True)
        output_sets(task, settings)  # raises InputError: exists, not writable, ...
        run.append(task)
    return run, skipped


# --- registering ----------------------------------------------------------------------------------------------


_MODEL_LOADS = {"count": 0}


def load_model(settings: Settings) -> LoadedModel:
    """The model of the run, loaded and checked (counted: a Dask worker loads it once)."""
    from crd_jax.registration.model import load

    if settings.bf16:
        from crd_jax.ops.conv import bf16_inference

        bf16_inference(True)
    loaded = load(settings.model)
    _MODEL_LOADS["count"] += 1
    return loaded


def register_task(loaded: LoadedModel, task: Task, settings: Settings) -> Outcome:
    """Registers one pair and writes its output set (atomically); bad input raises :class:`InputError`."""
    from crd_jax.allocator import release_free_memory
    from crd_jax.registration.pipeline import labels_on_grid, load_pair, register_volumes
    from crd_jax.registration.writing import dice_scores, geometry_only, registration_record, write_registration

    written = _written(task, settings)
    sets = output_sets(task, settings)
    t0 = time.perf_counter()
    timings: Dict[str, float] = {}
    fixed, moving, moving_seg, fixed_seg = load_pair(loaded, task.fixed, task.moving, task.moving_seg, task.fixed_seg)
    timings["load"] = time.perf_counter() - t0
    result, notes = register_volumes(
        loaded,
        fixed,
        moving,
        moving_seg,
        jacobian=written.jacobian,
        network_field=written.disp_format == "compact",
        **settings.kwargs,
    )
    dice = None
    if fixed_seg is not None and "warped_seg" in result:
        dice = dice_scores(result["warped_seg"], labels_on_grid(fixed_seg, fixed))
    seconds = time.perf_counter() - t0
    fixed, moving, moving_seg, fixed_seg = geometry_only(fixed), geometry_only(moving), None, None
    release_free_memory()
    t = time.perf_counter()
    record = registration_record(
        loaded,
        task.fixed,
        task.moving,
        task.moving_seg,
        result,
        notes,
        seconds,
        dict(settings.used),
        task.fixed_seg,
        timings,
        dice,
    )
    record["pair"] = {"name": task.name, "row": task.row}
    record["process"] = {"host": socket.gethostname(), "pid": os.getpid(), "model_loads": _MODEL_LOADS["count"]}
    disp_set = sets[1] if len(sets) > 1 else None
    if disp_set is not None:
        with disp_set as disp_stage, sets[0] as stage:  # the pair's folder lands first, then the displacement
            write_registration(stage, written, result, fixed, moving, record, disp_stage)
    else:
        with sets[0] as stage:
            write_registration(stage, written, result, fixed, moving, record)
    log.debug("%s: write: %.2f s", task.name, time.perf_counter() - t)  # after the record: not in its timings
    outcome = Outcome(
        task,
        "done",
        time.perf_counter() - t0,
        int(result["folds"]),
        warning=result.get("warning"),
        dice=None if dice is None else dice["mean"],
        pid=os.getpid(),
        model_loads=_MODEL_LOADS["count"],
    )
    del result
    release_free_memory()
    return outcome


def one_line(exc: BaseException) -> str:
    """An exception as one line (an :class:`InputError` names its file; anything else its type)."""
    text = " ".join(str(exc).split())
    return text if isinstance(exc, InputError) else f"{type(exc).__name__}: {text}"


def attempt(loaded: LoadedModel, task: Task, settings: Settings, keep_going: bool) -> Outcome:
    """:func:`register_task`, a failure returned as a ``failed`` outcome: bad input always (the caller stops
    without ``keep_going``), any other error only with ``keep_going`` (else it propagates with its traceback)."""
    try:
        return register_task(loaded, task, settings)
    except InputError as exc:
        return Outcome(task, "failed", reason=one_line(exc), pid=os.getpid())
    except Exception as exc:
        if not keep_going:
            raise
        log.debug("%s failed", task.name, exc_info=True)
        return Outcome(task, "failed", reason=one_line(exc), pid=os.getpid())


Report = Callable[[Outcome], None]


def run_serial(
    tasks: Sequence[Task], settings: Settings, keep_going: bool, report: Report, loaded: Optional[LoadedModel] = None
) -> List[Outcome]:
    """Every task in this process, in order; without ``keep_going`` the first failure ends the run
    (:class:`InputError`: the pairs before it stay complete)."""
    loaded = loaded or load_model(settings)
    outcomes = []
    for task in tasks:
        outcome = attempt(loaded, task, settings, keep_going)
        outcomes.append(outcome)
        report(outcome)
        if outcome.status == "failed" and not keep_going:
            raise InputError(f"row {task.row} ({task.name})", outcome.reason)
    return outcomes


# --- Dask ---------------------------------------------------------------------------------------------------------

_WORKER_MODELS: Dict[Tuple[str, bool], object] = {}


def _on_worker(task: Task, settings: Settings, keep_going: bool) -> Outcome:
    """A Dask task: the worker's model (loaded and compiled on its first pair, kept for the next ones)."""
    key = (settings.model, settings.bf16)
    if key not in _WORKER_MODELS:
        from crd_jax.user_cache import enable_compilation_cache

        enable_compilation_cache()  # the workers share the user's compiled programs
        logging.getLogger("crd_jax.registration.steps").setLevel(logging.WARNING)
        _WORKER_MODELS[key] = load_model(settings)
    return attempt(_WORKER_MODELS[key], task, settings, keep_going)


DASK_EXTRA = 'the Dask runner needs the dask extra: pip install "crd-jax[dask]" (dask[distributed])'


def dask_client(address: str) -> distributed.Client:
    """A :class:`distributed.Client` of the scheduler at ``address``, or of a new ``LocalCluster`` of N
    single-threaded worker processes for ``local:N``."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise InputError("--dask", DASK_EXTRA) from None
    match = re.fullmatch(r"local:(\d+)", address)
    if match:
        n = int(match.group(1))
        if n < 1:
            raise InputError("--dask", f"{address!r}: local:N needs N >= 1 workers")
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
        return Client(cluster)
    try:
        return Client(address, timeout="30s")
    except (OSError, TimeoutError) as exc:
        raise InputError("--dask", f"cannot reach the scheduler at {address!r} ({one_line(exc)})") from None


def run_dask(address: str, tasks: Sequence[Task], settings: Settings, keep_going: bool, report: Report) -> List[Outcome]:
    """Every task on a Dask cluster, one model per worker; outcomes reported as they come in. Without
    ``keep_going`` the first failure cancels the pairs not yet started and ends the run."""
    client = dask_client(address)
    try:
        from distributed import as_completed

        futures = [
            client.submit(_on_worker, task, settings, keep_going, pure=False, key=f"crd-jax-pair-{task.index}") for task in tasks
        ]
        outcomes = []
        for future in as_completed(futures):
            outcome = future.result()
            outcomes.append(outcome)
            report(outcome)
            if outcome.status == "failed" and not keep_going:
                client.cancel(futures)
                raise InputError(f"row {outcome.task.row} ({outcome.task.name})", outcome.reason)
        return sorted(outcomes, key=lambda o: o.task.index)
    finally:
        cluster = getattr(client, "cluster", None)
        client.close()
        if cluster is not None:
            cluster.close()


# --- the failures file ----------------------------------------------------------------------------------------


def failures_name(k: int, n: int) -> str:
    """``failures.csv``, or ``failures_K_of_N.csv`` for shard K of N (shards share the output root)."""
    return "failures.csv" if n == 1 else f"failures_{k}_of_{n}.csv"


def write_failures(path: Path, failed: Sequence[Outcome]) -> None:
    """``row,name,fixed,moving,reason``, one line per failed pair (written atomically); with none, an earlier
    run's file is removed, so the file always describes the latest run."""
    from crd_jax.data.io import atomic_path

    if not failed:
        if path.is_file():
            path.unlink()
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["row", "name", "fixed", "moving", "reason"])
    for o in sorted(failed, key=lambda o: o.task.index):
        writer.writerow([o.task.row, o.task.name, o.task.fixed, o.task.moving, o.reason])
    with atomic_path(path) as tmp:
        Path(tmp).write_text(buffer.getvalue())


# --- the Dice summary ---------------------------------------------------------------------------------------------


def summary_name(k: int, n: int) -> str:
    """``summary.json``, or ``summary_K_of_N.json`` for shard K of N (shards share the output root)."""
    return "summary.json" if n == 1 else f"summary_{k}_of_{n}.json"


def saved_dice(task: Task, settings: Settings) -> Optional[float]:
    """The mean Dice a complete (skipped) pair's ``registration.json`` recorded, ``None`` when it has none."""
    import json

    try:
        record = json.loads((Path(settings.out_root) / task.name / "registration.json").read_text())
        value = (record.get("dice") or {}).get("mean")
    except (OSError, ValueError, AttributeError):
        return None
    return None if value is None else float(value)


def dice_summary(
    finished: Sequence[Outcome],
    skipped: Sequence[Task],
    settings: Settings,
    pairs: int,
    failed: int,
    pairs_file: str,
    shard: Tuple[int, int],
) -> dict:
    """What ``summary.json`` holds: the run's counts and, over the pairs with both label maps (registered now,
    or complete from an earlier run and skipped: their recorded Dice), each pair's mean Dice in file order with
    their mean and standard deviation (population, as ``evaluate`` reports it); ``None`` without such a pair."""
    import numpy as np

    import crd_jax

    found = [(o.task, o.dice) for o in finished if o.status == "done" and o.dice is not None]
    found += [(t, saved_dice(t, settings)) for t in skipped if t.fixed_seg and t.moving_seg]
    per_pair = {t.name: d for t, d in sorted(found, key=lambda x: x[0].index) if d is not None}
    values = np.asarray(list(per_pair.values()), np.float64)
    dice = {
        "pairs": len(per_pair),
        "mean": round(float(values.mean()), 6) if values.size else None,
        "sd": round(float(values.std()), 6) if values.size else None,
        "per_pair": per_pair,
    }
    return {
        "pairs_file": str(Path(pairs_file).absolute()),
        "shard": list(shard),
        "pairs": pairs,
        "registered": sum(o.status == "done" for o in finished),
        "skipped": len(skipped),
        "failed": failed,
        "dice": dice,
        "crd_jax": crd_jax.__version__,
    }


def write_summary(path: Path, summary: Mapping) -> None:
    """``summary.json``, written atomically (a reader never sees half of it)."""
    import json

    from crd_jax.data.io import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2) + "\n")
