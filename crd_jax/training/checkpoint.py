"""Checkpoints (Orbax) and exported models.

* Inside a stage, :class:`StageCheckpointer` keeps the latest ``keep`` checkpoints of
  ``{params, opt_state, step}`` under ``<stage>/ckpt/<step>``. Orbax writes each one to a temporary folder
  and renames it when complete, so a killed run never leaves a checkpoint that looks finished.
* A finished stage is exported as a model folder (``<stage>/model``): ``params/`` (Orbax) and ``model.json``
  (architecture, resolution factor, preprocessing, label set) -- everything ``crd-jax register`` needs.
  The folder is assembled under a temporary name and renamed into place, so its presence means "done".
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from crd_jax.errors import InputError

MODEL_JSON = "model.json"
FORMAT_VERSION = 1


class StageCheckpointer:
    def __init__(self, directory: Path, keep: int = 2):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Dict[str, Any]) -> None:
        self.manager.save(step, args=ocp.args.StandardSave(state))
        self.manager.wait_until_finished()

    def restore(self, step: int, like: Dict[str, Any], sharding=None) -> Dict[str, Any]:
        """Restores onto ``sharding`` (e.g. replicated over the mesh) with the structure of ``like``."""
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype, sharding=sharding),
            like,
        )
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self.manager.close()


def _host_tree(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


def _this_process_only() -> ocp.StandardCheckpointer:
    """A checkpointer that neither waits for nor involves other processes (model folders hold host
    arrays that one process writes and any process may read)."""
    me = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.StandardCheckpointer(multiprocessing_options=options)


def save_model(directory: Path, params, spec: Dict[str, Any]) -> None:
    """Writes ``params`` and ``spec`` (JSON) as a model folder, atomically (build beside, then rename)."""
    directory = Path(directory).absolute()
    if directory.exists() and not directory.is_dir():
        raise InputError(directory, "exists and is not a folder")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        with _this_process_only() as ckpt:
            ckpt.save(tmp / "params", _host_tree(params))
            ckpt.wait_until_finished()
        (tmp / MODEL_JSON).write_text(json.dumps({"format_version": FORMAT_VERSION, **spec}, indent=2))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_spec(directory: Path) -> Dict[str, Any]:
    directory = Path(directory)
    path = directory / MODEL_JSON
    if not directory.is_dir():
        raise InputError(directory, "no such model folder")
    if not path.exists():
        raise InputError(directory, f"not a crd-jax model folder (no {MODEL_JSON})")
    try:
        spec = json.loads(path.read_text())
    except ValueError as exc:
        raise InputError(path, f"unreadable model description ({exc})") from None
    if spec.get("format_version") != FORMAT_VERSION:
        raise InputError(path, f"unsupported model format version {spec.get('format_version')}")
    return spec


def load_model(directory: Path, like=None):
    """``(params, spec)`` of a model folder. ``like``: a pytree of the expected structure (optional)."""
    directory = Path(directory).absolute()
    spec = load_spec(directory)
    try:
        with _this_process_only() as ckpt:
            if like is None:
                params = ckpt.restore(directory / "params")
            else:
                abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
                params = ckpt.restore(directory / "params", abstract)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(directory, f"parameters do not load ({type(exc).__name__}: {str(exc)[:200]})") from None
    return params, spec
