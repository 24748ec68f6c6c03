"""A workdir remembers the config it was trained with: ``config.json`` is the first one (never rewritten),
and every accepted change is appended to ``config_history.jsonl`` (time, the changed fields with their old and
new values, the whole new config).

Resuming with a config that changed in a way that touches what was already trained is refused with one
line naming the field: any global section (``seed``, ``data``, ``model``, ``loss``, ``train``, ``eval``) or a
stage that has started (``stages/<name>`` exists), or a pipeline that is not the old one with stages added
at the end. Appending stages (a long experiment grows) and defining or changing stages that have not
started are allowed; so are settings that do not change what is trained (:data:`FREE`). ``train.py
--allow-config-change`` (``pipeline.run(..., allow_config_change=True)``) accepts any change; it is recorded.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

from crd_jax.errors import InputError

if TYPE_CHECKING:
    import ml_collections

FIRST = "config.json"
HISTORY = "config_history.jsonl"
# settings that change neither the parameters trained nor the results: free to change between resumes
FREE = (
    "workdir",
    "name",
    "distributed.",
    "train.progress_bar",
    "train.deadline",
    "train.teacher_cache_gb",
    "train.teacher_cache_disk_gb",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "data.prefetch",
    "data.cache_size",
    "eval.timing_repeats",
    "eval.val_pairs",
    "eval.diagnostics",
)


def _plain(config) -> Dict[str, Any]:
    return json.loads(config.to_json_best_effort(sort_keys=True))


def _flat(tree, prefix: str = "") -> Dict[str, Any]:
    out = {}
    if isinstance(tree, dict) and tree:
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = tree
    return out


def remembered(workdir: Path) -> Optional[Dict[str, Any]]:
    """The config the workdir was last run with (``None`` for a new workdir)."""
    first = Path(workdir) / FIRST
    if not first.exists():
        return None
    try:
        config = json.loads(first.read_text())
        history = Path(workdir) / HISTORY
        if history.exists():
            for line in history.read_text().splitlines():
                if line.strip():
                    config = json.loads(line)["config"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(
            first, f"the workdir's config record does not read ({type(exc).__name__}); it was edited or damaged"
        ) from None
    return config


def _defaults() -> Dict[str, Any]:
    from crd_jax.config import base_config

    return _flat(_plain(base_config()))


def changes(old: Dict[str, Any], new: Dict[str, Any]) -> Dict[str, Tuple[Any, Any]]:
    """Fields whose value differs. A field the old record lacks and the new config holds at its default is
    not a change: a newer crd-jax added it, and its default is what the old run did."""
    a, b = _flat(old), _flat(new)
    missing = object()
    defaults = _defaults()
    return {
        k: (a.get(k), b.get(k))
        for k in sorted(set(a) | set(b))
        if a.get(k, missing) != b.get(k, missing) and not (k not in a and k in defaults and b.get(k) == defaults[k])
    }


def _free(key: str) -> bool:
    return any(key == f or (f.endswith(".") and key.startswith(f)) for f in FREE)


def check_resume(config: ml_collections.ConfigDict, workdir: Path, allow: bool = False) -> Dict[str, Tuple[Any, Any]]:
    """The changes since the workdir's last run; raises :class:`InputError` (one line, the first field) for a
    change that is not allowed (see the module). Reads only."""
    old = remembered(workdir)
    if old is None:
        return {}
    new = _plain(config)
    diff = changes(old, new)
    if allow:
        return diff
    old_pipeline, new_pipeline = list(old.get("pipeline", [])), list(new.get("pipeline", []))
    started = {p.name for p in (Path(workdir) / "stages").glob("*") if p.is_dir()}
    for key, (was, now) in diff.items():
        if _free(key):
            continue
        if key == "pipeline":
            if new_pipeline[: len(old_pipeline)] == old_pipeline:
                continue  # stages appended at the end
            problem = f"changed from {old_pipeline} to {new_pipeline} (only appending stages is allowed)"
        elif key.startswith("stages.") and key.split(".")[1] not in started:
            continue  # a stage that has not started yet
        else:
            problem = f"changed from {was!r} to {now!r}"
            if key.startswith("stages."):
                problem += f" after stage '{key.split('.')[1]}' started"
        raise InputError(
            f"config.{key}",
            f"{problem} since this workdir ({workdir}) was run; the stages trained so far "
            "used the old value: use a new workdir, or pass --allow-config-change to go on "
            f"with the change (recorded in {HISTORY})",
        )
    return diff


def record(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """``config.json`` for a new workdir; else the changes, if any, appended to ``config_history.jsonl``."""
    from crd_jax.training.pipeline import write_text

    first = Path(workdir) / FIRST
    if not first.exists():
        write_text(first, config.to_json_best_effort(indent=2, sort_keys=True))
        return
    old = remembered(workdir)
    new = _plain(config)
    diff = {k: v for k, v in changes(old, new).items() if k != "workdir"}
    if not diff:
        return
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "changed": {k: list(v) for k, v in diff.items()}, "config": new}
    with open(Path(workdir) / HISTORY, "a") as f:
        f.write(json.dumps(entry, sort_keys=True, default=str) + "\n")


_locks: Dict[str, int] = {}


class WorkdirBusy(InputError):
    """Another process holds the workdir's lock (its files are not ours to clean up)."""


def lock(workdir: Path) -> None:
    """Holds an exclusive lock on ``<workdir>/.lock`` for the rest of the process: a second ``train.py`` on the
    same workdir is refused with one line instead of training beside the first."""
    import fcntl
    import os

    key = str(Path(workdir).absolute())
    if key in _locks:
        return
    fd = os.open(Path(workdir) / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise WorkdirBusy(
            workdir, f"another training process (pid {holder}) is running in this workdir; wait for it or use another workdir"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _locks[key] = fd
