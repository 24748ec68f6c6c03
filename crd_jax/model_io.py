"""Model folders: what a finished stage exports and ``crd-jax register`` loads.

A model folder holds ``model.json`` (architecture, resolution factor, preprocessing, label set: everything
needed to rebuild and run the model) and ``params.msgpack`` (the parameters as plain arrays,
``flax.serialization``). It is assembled under a temporary name and renamed into place, so its presence
means "complete"; format 1 (an Orbax ``params/`` folder, earlier releases) is still read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict

import jax
import numpy as np
from flax import serialization

from crd_jax.errors import InputError
from crd_jax.outputs import share_tree

MODEL_JSON = "model.json"
PARAMS_FILE = "params.msgpack"
FORMAT_VERSION = 2
FORMATS = (1, 2)  # 1: Orbax params/ folder (read only)


def _host_tree(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


def _this_process_only():
    """A checkpointer that neither waits for nor involves other processes (model folders hold host
    arrays that one process writes and any process may read)."""
    me = jax.process_index()
    import orbax.checkpoint as ocp  # only format-1 folders need it (and it is slow to import)

    options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.StandardCheckpointer(multiprocessing_options=options)


def is_model_folder(directory: Path) -> bool:
    """A folder crd-jax wrote as a model: ``model.json`` with our format marker."""
    try:
        return json.loads((Path(directory) / MODEL_JSON).read_text()).get("format_version") in FORMATS
    except (OSError, ValueError, AttributeError):
        return False


def save_model(directory: Path, params, spec: Dict[str, Any], overwrite: bool = False) -> None:
    """Writes ``params`` (``params.msgpack``, plain arrays) and ``spec`` (``model.json``) as a model folder,
    atomically (built beside, then renamed). An existing folder is replaced only if crd-jax wrote it as a
    model folder and ``overwrite`` is set; anything else there is an error and stays untouched."""
    directory = Path(directory).absolute()
    if directory.exists() or directory.is_symlink():
        if not directory.is_dir():
            raise InputError(directory, "exists and is not a folder; nothing was changed")
        if not is_model_folder(directory):
            raise InputError(directory, "exists and is not a crd-jax model folder; nothing was changed (choose a new folder)")
        if not overwrite:
            raise InputError(directory, "a model folder exists there; pass --overwrite to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    old = None
    try:
        (tmp / PARAMS_FILE).write_bytes(serialization.msgpack_serialize(_host_tree(params)))
        (tmp / MODEL_JSON).write_text(json.dumps({"format_version": FORMAT_VERSION, **spec}, indent=2))
        share_tree(tmp)
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            os.replace(directory, old / "model")
        os.replace(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # our own staging folder
        if old is not None:
            if not directory.exists():  # the new one did not land: put the old model back
                os.replace(old / "model", directory)
            shutil.rmtree(old, ignore_errors=True)  # the replaced crd-jax model folder (checked above)


def _check_params(directory: Path, params) -> None:
    leaves = jax.tree_util.tree_leaves(params)
    if not isinstance(params, dict):
        raise InputError(directory, "parameters are not a parameter tree (damaged model folder)")
    arrays = [np.asarray(x) for x in leaves]
    if any(not np.issubdtype(a.dtype, np.floating) for a in arrays):
        raise InputError(directory, "parameters hold non-float arrays (damaged model folder)")
    bad = sum(int((~np.isfinite(a)).sum()) for a in arrays)
    if bad:
        raise InputError(directory, f"parameters hold {bad} NaN/Inf values (damaged model folder)")
    if arrays and all(not a.any() for a in arrays):
        raise InputError(directory, "parameters are all zero (damaged or never trained)")


def _same_structure(params, like) -> bool:
    a = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    b = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(like)}
    return a == b


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
    if spec.get("format_version") not in FORMATS:
        raise InputError(path, f"unsupported model format version {spec.get('format_version')}")
    return spec


def load_model(directory: Path, like=None):
    """``(params, spec)`` of a model folder. ``like``: a pytree of the expected structure (optional).

    Format 2 stores ``params.msgpack``; format 1 (earlier releases) an Orbax ``params/`` folder."""
    directory = Path(directory).absolute()
    spec = load_spec(directory)
    packed = directory / PARAMS_FILE
    if packed.exists():
        if packed.stat().st_size == 0:
            raise InputError(packed, "parameter file is empty (damaged model folder)")
        try:
            params = serialization.msgpack_restore(packed.read_bytes())
        except Exception as exc:  # msgpack raises many types for damaged bytes
            raise InputError(packed, f"parameter file does not decode ({type(exc).__name__}; damaged model folder)") from None
        _check_params(packed, params)
        if like is not None and not _same_structure(params, like):
            raise InputError(packed, "parameters do not match the model's architecture")
        return params, spec
    legacy = directory / "params"
    if not legacy.is_dir():
        raise InputError(directory, f"no {PARAMS_FILE} in the model folder")
    empty = [p for p in legacy.rglob("*") if p.is_file() and p.stat().st_size == 0]
    if empty:  # Orbax would fail asynchronously with tracebacks
        raise InputError(empty[0], "parameter file is empty (damaged model folder)")
    try:
        with _this_process_only() as ckpt:
            if like is None:
                params = ckpt.restore(legacy)
            else:
                import orbax.checkpoint as ocp

                abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
                params = ckpt.restore(legacy, abstract)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(directory, f"parameters do not load ({type(exc).__name__}: {str(exc)[:200]})") from None
    _check_params(legacy, params)
    return params, spec
